"""One model configuration for both checkpoint layouts (Hugging Face `config.json`, reference `params.json`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint or placement file the user gave us is wrong; the message names the file and field."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # None: full attention
    max_seq_len: int = 32768  # the longest context the model accepts (prompt + generated)
    num_experts: int = 0  # 0: a dense SwiGLU feed-forward
    num_experts_per_tok: int = 2
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def arch(self) -> str:
        return "mixtral" if self.is_moe else "mistral"

    @property
    def kv_group(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def validate(self, source: str = "<config>") -> ModelConfig:
        positive = ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{source}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window <= 0
        ):
            raise ConfigError(
                f"{source}: field 'sliding_window' must be a positive integer or null, got {self.sliding_window!r}"
            )
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"{source}: field 'norm_eps' must be a small positive number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"{source}: field 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ConfigError(f"{source}: field 'num_experts' must be a non-negative integer, got {self.num_experts!r}")
        if self.is_moe and not (
            isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= self.num_experts
        ):
            raise ConfigError(
                f"{source}: field 'num_experts_per_tok' must be between 1 and num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok!r}"
            )
        return self

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads for this model."""
        out: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": self.arch,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        }
        if self.is_moe:
            out["num_local_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
        return out

    def to_params_dict(self) -> dict[str, Any]:
        """The reference layout's `params.json`."""
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "sliding_window": self.sliding_window,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.is_moe:
            out["moe"] = {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok}
        return out


PRESETS: dict[str, ModelConfig] = {
    "mistral-7b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
        vocab_size=32000,
        norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        max_seq_len=32768,
    ),
    "mixtral-8x7b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
        vocab_size=32000,
        norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=4096,
        max_seq_len=32768,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    # Mixtral 8x22B (mistralai/Mixtral-8x22B-v0.1 config.json): full attention over 64k tokens, no window.
    "mixtral-8x22b": ModelConfig(
        dim=6144,
        n_layers=56,
        n_heads=48,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=16384,
        vocab_size=32768,
        norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        max_seq_len=65536,
        num_experts=8,
        num_experts_per_tok=2,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # bad syntax, or an integer of over 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _field(
    data: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...] = int, default: Any = dataclasses.MISSING
) -> Any:
    if key not in data:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing field '{key}'")
        return default
    value = data[key]
    if value is None and default is None:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float or kind == (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int) and not -1e308 < value < 1e308:
            raise ConfigError(f"{path}: field '{key}' is out of range: {value!r}")
    if not ok:
        raise ConfigError(f"{path}: field '{key}' has the wrong type: {value!r}")
    return value


def from_hf_config(path: Path) -> ModelConfig:
    data = _read_json(path)
    model_type = data.get("model_type")
    if model_type not in ("mistral", "mixtral"):
        raise ConfigError(f"{path}: field 'model_type' is {model_type!r}; only 'mistral' and 'mixtral' are supported")
    dim = _field(data, "hidden_size", path)
    n_heads = _field(data, "num_attention_heads", path)
    head_dim = data.get("head_dim")
    if head_dim is None:
        if not isinstance(n_heads, int) or n_heads <= 0 or dim % n_heads:
            raise ConfigError(
                f"{path}: 'head_dim' is absent and hidden_size {dim} is not divisible by num_attention_heads {n_heads}"
            )
        head_dim = dim // n_heads
    # Hub files carry `rope_theta`; transformers >= 5 writes it inside `rope_parameters`.
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(
                f"{path}: field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported"
            )
        rope_theta = _field(rope, "rope_theta", path, (int, float))
    else:
        rope_theta = _field(data, "rope_theta", path, (int, float), 10000.0)
    eos = data.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0] if eos else 2
    cfg = ModelConfig(
        dim=dim,
        n_layers=_field(data, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=_field(data, "num_key_value_heads", path, int, n_heads),
        head_dim=_field({"head_dim": head_dim}, "head_dim", path),
        hidden_dim=_field(data, "intermediate_size", path),
        vocab_size=_field(data, "vocab_size", path),
        norm_eps=float(_field(data, "rms_norm_eps", path, (int, float), 1e-5)),
        rope_theta=float(rope_theta),
        sliding_window=_field(data, "sliding_window", path, int, None),
        max_seq_len=_field(data, "max_position_embeddings", path, int, 32768),
        num_experts=_field(data, "num_local_experts", path) if model_type == "mixtral" else 0,
        num_experts_per_tok=_field(data, "num_experts_per_tok", path, int, 2) if model_type == "mixtral" else 2,
        bos_token_id=data.get("bos_token_id") if isinstance(data.get("bos_token_id"), int) else 1,
        eos_token_id=eos if isinstance(eos, int) else 2,
    )
    if data.get("tie_word_embeddings"):
        raise ConfigError(
            f"{path}: field 'tie_word_embeddings' is true; Mistral checkpoints have a separate output head"
        )
    return cfg.validate(str(path))


def from_params_json(path: Path) -> ModelConfig:
    data = _read_json(path)
    moe = data.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"{path}: field 'moe' must be an object with num_experts and num_experts_per_tok")
    dim = _field(data, "dim", path)
    n_heads = _field(data, "n_heads", path)
    cfg = ModelConfig(
        dim=dim,
        n_layers=_field(data, "n_layers", path),
        n_heads=n_heads,
        n_kv_heads=_field(data, "n_kv_heads", path),
        head_dim=_field(data, "head_dim", path, int, dim // n_heads if n_heads else 0),
        hidden_dim=_field(data, "hidden_dim", path),
        vocab_size=_field(data, "vocab_size", path),
        norm_eps=float(_field(data, "norm_eps", path, (int, float))),
        rope_theta=float(_field(data, "rope_theta", path, (int, float), 10000.0)),
        sliding_window=_field(data, "sliding_window", path, int, None),
        max_seq_len=_field(data, "max_seq_len", path, int, 32768),
        num_experts=_field(moe, "num_experts", path) if moe else 0,
        num_experts_per_tok=_field(moe, "num_experts_per_tok", path, int, 2) if moe else 2,
    )
    return cfg.validate(str(path))


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read the configuration of a checkpoint directory in either layout."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ConfigError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / "config.json").is_file():
        return from_hf_config(root / "config.json")
    if (root / "params.json").is_file():
        return from_params_json(root / "params.json")
    raise ConfigError(f"{root}: neither config.json (Hugging Face layout) nor params.json (reference layout) found")

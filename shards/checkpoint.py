"""Safetensors checkpoints in both layouts, read by selection so a shard loads only its own tensors.

Inside the project every tensor carries its Hugging Face name. The reference layout (`params.json` +
`consolidated.safetensors`) is translated on read and on write, including the query/key row permutation that
turns its interleaved rotary pairs into the rotate-half convention.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shards.config import ConfigError, ModelConfig, load_config
from shards.hf_tokenizer_files import write_hf_tokenizer_files
from shards.random_source import is_random_checkpoint, random_tensor, read_marker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ConfigError):
    """A checkpoint file is missing, damaged, or does not match its configuration; the message names which."""


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class ShardSelection:
    """Which of the model's tensors one shard holds."""

    embedding: bool = False
    layers: tuple[int, ...] = ()  # attention, norms, and the gate (MoE) or the dense feed-forward
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> expert ids
    final_norm: bool = False
    head: bool = False
    # (start, stop): the experts' hidden rows held (w1/w3 rows, w2 columns); None: all of them. Two groups holding
    # the same experts in rows 0:7168 and 7168:14336 each compute half of every chosen expert; their sums add up.
    hidden_rows: tuple[int, int] | None = None

    @staticmethod
    def whole(config: ModelConfig) -> ShardSelection:
        experts = {i: tuple(range(config.num_experts)) for i in range(config.n_layers)} if config.is_moe else {}
        return ShardSelection(True, tuple(range(config.n_layers)), experts, True, True)

    def expert_rows(self, config: ModelConfig) -> slice:
        """The hidden rows of each held expert (`hidden_rows`)."""
        return slice(*self.hidden_rows) if self.hidden_rows is not None else slice(0, config.hidden_dim)

    def tensor_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> expected shape, for every tensor of this selection (an expert's: its part)."""
        d, h, hd = config.dim, config.hidden_dim, config.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        if self.embedding:
            shapes["model.embed_tokens.weight"] = (config.vocab_size, d)
        for i in self.layers:
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (d,)
            shapes[p + "post_attention_layernorm.weight"] = (d,)
            shapes[p + "self_attn.q_proj.weight"] = (config.n_heads * hd, d)
            shapes[p + "self_attn.k_proj.weight"] = (config.n_kv_heads * hd, d)
            shapes[p + "self_attn.v_proj.weight"] = (config.n_kv_heads * hd, d)
            shapes[p + "self_attn.o_proj.weight"] = (d, config.n_heads * hd)
            if config.is_moe:
                shapes[p + "block_sparse_moe.gate.weight"] = (config.num_experts, d)
            else:
                shapes[p + "mlp.gate_proj.weight"] = (h, d)
                shapes[p + "mlp.up_proj.weight"] = (h, d)
                shapes[p + "mlp.down_proj.weight"] = (d, h)
        rows = self.expert_rows(config)
        he = rows.stop - rows.start
        for i, ids in sorted(self.experts.items()):
            for e in ids:
                p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
                shapes[p + "w1.weight"] = (he, d)
                shapes[p + "w3.weight"] = (he, d)
                shapes[p + "w2.weight"] = (d, he)
        if self.final_norm:
            shapes["model.norm.weight"] = (d,)
        if self.head:
            shapes["lm_head.weight"] = (config.vocab_size, d)
        return shapes

    def nbytes(self, config: ModelConfig, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(_numel(s) for s in self.tensor_shapes(config).values()) * size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- the reference layout's names -------------------------------------------------------------------------

_TO_REFERENCE = [
    (r"^model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"layers.\1.attention.wq.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"layers.\1.attention.wk.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"layers.\1.attention.wv.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"layers.\1.attention.wo.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$", r"layers.\1.feed_forward.gate.weight"),
    (
        r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$",
        r"layers.\1.feed_forward.experts.\2.\3.weight",
    ),
]


def reference_name(hf_name: str) -> str:
    for pattern, repl in _TO_REFERENCE:
        if re.match(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise KeyError(hf_name)


def rotary_rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reference wq/wk rows pair (2i, 2i+1) per head; the HF layout pairs (i, i + head_dim/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rotary_rows_to_reference(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rotary_heads(hf_name: str, config: ModelConfig) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.n_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.n_kv_heads
    return None


# --- reading ---------------------------------------------------------------------------------------------


class CheckpointReader:
    """Where each tensor of a checkpoint lives, so a selection opens only the files it needs."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.root = Path(checkpoint_dir)
        self.config = load_config(self.root)
        self.layout = "hf" if (self.root / "config.json").is_file() else "reference"
        # A random checkpoint has no files: each tensor is made on its device when loaded (shards/random_source.py).
        self.random = read_marker(self.root) if is_random_checkpoint(self.root) else None
        self.file_of = self._index() if self.random is None else {}

    def _index(self) -> dict[str, Path]:
        index_file = self.root / (
            "model.safetensors.index.json" if self.layout == "hf" else "consolidated.safetensors.index.json"
        )
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
            return {name: self.root / fname for name, fname in weight_map.items()}
        pattern = "*.safetensors" if self.layout == "hf" else "consolidated*.safetensors"
        files = sorted(self.root.glob(pattern))
        if not files:
            found = sorted(p.name for p in self.root.iterdir())
            raise CheckpointError(
                f"{self.root}: no {pattern} files (found {found}); only safetensors checkpoints are read"
            )
        where: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():  # noqa: SIM118 - a safetensors handle, not a dict
                where[name] = f
        return where

    @staticmethod
    def _open(path: Path, device: str = "cpu"):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        try:
            return safe_open(str(path), framework="pt", device=device)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def stored_name(self, hf_name: str) -> str:
        return hf_name if self.layout == "hf" else reference_name(hf_name)

    def load(
        self, selection: ShardSelection, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The selected tensors, by Hugging Face name, in `dtype` (None: as stored) on `device`.

        Every shape is checked against the config before the tensor is read.
        """
        expected = replace(selection, hidden_rows=None).tensor_shapes(self.config)  # as stored: whole experts
        rows = selection.expert_rows(self.config)
        partial = selection.hidden_rows is not None

        def part_only(name: str) -> bool:
            return partial and ".block_sparse_moe.experts." in name

        if self.random is not None:
            seed, std = self.random
            out = {}
            for name, shape in expected.items():
                t = random_tensor(name, shape, seed, std, dtype or torch.float32, device)
                out[name] = _expert_part(name, t, rows) if part_only(name) else t
            return out
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            stored = self.stored_name(name)
            if stored not in self.file_of:
                raise CheckpointError(f"{self.root}: tensor {stored!r} is missing from the checkpoint")
            by_file.setdefault(self.file_of[stored], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            handle = self._open(path)
            for name in names:
                stored = self.stored_name(name)
                try:
                    shape = tuple(handle.get_slice(stored).get_shape())
                except (SafetensorError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: tensor {stored!r} cannot be read ({e})") from None
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {stored!r} has shape {list(shape)}, the config asks for {list(expected[name])}"
                    )
                try:
                    if part_only(name):
                        t = _expert_part(name, handle.get_slice(stored), rows)
                    else:
                        t = handle.get_tensor(stored)
                except (SafetensorError, RuntimeError, OSError) as e:
                    raise CheckpointError(f"{path}: tensor {stored!r} cannot be read ({e})") from None
                if not t.is_floating_point():
                    raise CheckpointError(
                        f"{path}: tensor {stored!r} has dtype {t.dtype}, expected a floating-point type"
                    )
                heads = _rotary_heads(name, self.config)
                if heads is not None and self.layout == "reference":
                    t = rotary_rows_to_hf(t, heads)
                out[name] = t.to(device=device, dtype=dtype or t.dtype)
                del t
        return out


def _expert_part(name: str, tensor, rows: slice):
    """An expert tensor's `rows` (w1, w3: rows; w2: columns). `tensor` may be a safetensors slice, which then reads
    only that part from the file."""
    part = tensor[:, rows] if name.endswith("w2.weight") else tensor[rows]
    return part.contiguous() if isinstance(part, torch.Tensor) else part


class HostCopy:
    """A reader whose selections were read into host memory ahead of time: `load` copies them to the device from
    there (host-memory speed) and reads no checkpoint file. A standby worker holds one, so that when it takes a dead
    worker's place its weights do not come from disk again."""

    def __init__(self, reader: CheckpointReader, selections: list[ShardSelection], dtype: torch.dtype) -> None:
        self.reader, self.config, self.dtype = reader, reader.config, dtype
        self.tensors: dict[str, torch.Tensor] = {}
        for selection in selections:
            self.tensors.update(reader.load(selection, dtype=dtype, device="cpu"))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def load(
        self, selection: ShardSelection, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """As `CheckpointReader.load`, from the copy (what it lacks, from the checkpoint)."""
        names = selection.tensor_shapes(self.config)
        if any(n not in self.tensors for n in names) or (dtype or self.dtype) != self.dtype:
            return self.reader.load(selection, dtype=dtype, device=device)
        return {n: self.tensors[n].to(device=device) for n in names}


# --- writing ---------------------------------------------------------------------------------------------


def save_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    layout: str = "hf",
    max_shard_bytes: int | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write `tensors` (Hugging Face names) as a safetensors checkpoint in either layout, sharded if asked; a
    `tokenizer_file` goes in as `tokenizer.model`, with the Hugging Face tokenizer files derived from it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        named = {k: v.contiguous() for k, v in tensors.items()}
        (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        base = "model"
    elif layout == "reference":
        named = {}
        for k, v in tensors.items():
            heads = _rotary_heads(k, config)
            named[reference_name(k)] = (rotary_rows_to_reference(v, heads) if heads else v).contiguous()
        (out / "params.json").write_text(json.dumps(config.to_params_dict(), indent=2) + "\n")
        base = "consolidated"
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}; use 'hf' or 'reference'")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in named.items():
        if max_shard_bytes and size and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / f"{base}.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in named.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
        write_hf_tokenizer_files(out, model_max_length=config.max_seq_len)
    return out


def convert_checkpoint(src_dir: str | Path, out_dir: str | Path, layout: str) -> Path:
    """Rewrite a checkpoint in the other layout (tensor values unchanged)."""
    reader = CheckpointReader(src_dir)
    tensors = reader.load(ShardSelection.whole(reader.config), dtype=None)
    tok = Path(src_dir) / "tokenizer.model"
    return save_checkpoint(
        out_dir, reader.config, tensors, layout=layout, tokenizer_file=tok if tok.is_file() else None
    )

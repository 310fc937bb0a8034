"""gpt-fast beside ours: its Mixtral (`mixtral-moe/model.py`) and its dense model (`model.py`, our Mistral 7B shape
is its "Mistral-7B" config) on our checkpoint's weights, decode compiled as its `generate.py` compiles it, timed as
`bench/gpu_scale.py` times ours.

gpt-fast (pytorch-labs/gpt-fast, BSD-3-Clause) is not part of the project and is never copied into it: `root` is a
checkout (carried to a GPU host in the ignored `.peers/` folder) whose model file is imported from there at run
time. Its `generate.py` is not imported (it needs sentencepiece and its tokenizer); what in it sets the speed is
restated here: the inductor flags it sets, `decode_one_token` compiled with `mode="reduce-overhead", fullgraph=True`,
decode under SDPA's math backend (inductor then generates the attention), prefill eager, caches sized to prompt +
new tokens. Two departures: greedy argmax instead of its top-k sampling (ours is greedy too), and the Mixtral's
prefill in chunks of at most 8 tokens (its MoE gathers each token's two experts' weights: 512 tokens at once would
materialise ~360 GB).

Weights: our checkpoint's tensors by Hugging Face name under gpt-fast's names: q, k, v concatenated into `wqkv` with
the q and k rows back in the interleaved rotary order gpt-fast uses (the reference layout's), experts stacked into
`cond_ffn.w1/w2/w3`. On CPU in float32 its greedy tokens equal our LocalEngine's (tests/bench/test_peer_gpt_fast.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch._inductor.config

from bench.ceilings import checked_decode_figures, traces_from_clock
from shards.checkpoint import CheckpointReader, ShardSelection, rotary_rows_to_reference
from shards.config import ModelConfig

MOE_PREFILL_CHUNK = 8
# What gpt-fast's generate.py sets before compiling (both its generate.py files).
INDUCTOR_FLAGS = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True}
RECORD_TOKENS = 8  # reduce-overhead records its CUDA graph after warm-up calls: more than ours needs


def import_model_file(root: Path, moe: bool) -> ModuleType:
    """gpt-fast's `mixtral-moe/model.py` or `model.py`, under a name of its own (both files are called model.py)."""
    path = Path(root) / ("mixtral-moe/model.py" if moe else "model.py")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a gpt-fast checkout (pytorch-labs/gpt-fast)")
    name = "gpt_fast_mixtral_model" if moe else "gpt_fast_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def checkout_commit(root: Path) -> str | None:
    """The gpt-fast commit `root` holds: its git HEAD, or a COMMIT file written beside an exported copy."""
    root = Path(root)
    if (root / "COMMIT").is_file():
        return (root / "COMMIT").read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def model_args(module: ModuleType, cfg: ModelConfig, context: int):
    """Our config as gpt-fast's `ModelArgs`. Refused where gpt-fast would compute another model: it derives
    head_dim as dim / n_head and has no sliding window."""
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ValueError(f"gpt-fast needs head_dim = dim / n_heads; this model has {cfg.head_dim} x {cfg.n_heads}")
    if cfg.sliding_window is not None and cfg.sliding_window < context:
        raise ValueError(
            f"gpt-fast has no sliding window: a context of {context} passes this one ({cfg.sliding_window})"
        )
    kwargs = {
        "block_size": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_local_heads": cfg.n_kv_heads,
        "dim": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "rope_base": cfg.rope_theta,
        "norm_eps": cfg.norm_eps,
    }
    if cfg.is_moe:
        kwargs.update(num_experts=cfg.num_experts, num_activated_experts=cfg.num_experts_per_tok)
    return module.ModelArgs(**kwargs)


def named_config(module: ModuleType, args) -> str | None:
    """Which of gpt-fast's own configs `args` is (its context length aside), if any."""
    ours = dataclasses.replace(args, block_size=0)
    for name, kwargs in module.transformer_configs.items():
        if dataclasses.replace(module.ModelArgs(**kwargs), block_size=0) == ours:
            return name
    return None


def gpt_fast_tensors(reader: CheckpointReader, layer: int | None, dtype: torch.dtype, device) -> dict:
    """One layer's tensors (or, for None, the embedding, final norm and head) under gpt-fast's names."""
    cfg = reader.config
    if layer is None:
        t = reader.load(ShardSelection(embedding=True, final_norm=True, head=True), dtype, device)
        return {
            "tok_embeddings.weight": t["model.embed_tokens.weight"],
            "norm.weight": t["model.norm.weight"],
            "output.weight": t["lm_head.weight"],
        }
    experts = {layer: tuple(range(cfg.num_experts))} if cfg.is_moe else {}
    t = reader.load(ShardSelection(layers=(layer,), experts=experts), dtype, device)
    p, q = f"model.layers.{layer}.", f"layers.{layer}."
    wq = rotary_rows_to_reference(t.pop(p + "self_attn.q_proj.weight"), cfg.n_heads)
    wk = rotary_rows_to_reference(t.pop(p + "self_attn.k_proj.weight"), cfg.n_kv_heads)
    out = {
        q + "attention_norm.weight": t.pop(p + "input_layernorm.weight"),
        q + "ffn_norm.weight": t.pop(p + "post_attention_layernorm.weight"),
        q + "attention.wqkv.weight": torch.cat([wq, wk, t.pop(p + "self_attn.v_proj.weight")]),
        q + "attention.wo.weight": t.pop(p + "self_attn.o_proj.weight"),
    }
    if not cfg.is_moe:
        out[q + "feed_forward.w1.weight"] = t.pop(p + "mlp.gate_proj.weight")
        out[q + "feed_forward.w3.weight"] = t.pop(p + "mlp.up_proj.weight")
        out[q + "feed_forward.w2.weight"] = t.pop(p + "mlp.down_proj.weight")
        return out
    out[q + "block_sparse_moe.gate.weight"] = t.pop(p + "block_sparse_moe.gate.weight")
    for w in ("w1", "w3", "w2"):  # (experts, hidden, dim) for w1/w3, (experts, dim, hidden) for w2: as ours
        names = [f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.num_experts)]
        out[f"{q}block_sparse_moe.cond_ffn.{w}"] = torch.stack([t.pop(n) for n in names])
    return out


def _freqs_cis(args, dtype: torch.dtype) -> torch.Tensor:
    """gpt-fast's rotary table in `dtype`: its Mixtral file rounds it to bfloat16 whatever the model's dtype."""
    n = args.dim // args.n_head
    freqs = 1.0 / (args.rope_base ** (torch.arange(0, n, 2)[: n // 2].float() / n))
    freqs = torch.outer(torch.arange(args.block_size, device=freqs.device), freqs)
    cis = torch.polar(torch.ones_like(freqs), freqs)
    return torch.stack([cis.real, cis.imag], dim=-1).to(dtype)


def decode_one_token(model, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """gpt-fast's decode step, greedy: (1, 1) token -> (1, 1) next token."""
    logits = model(x, input_pos)
    return logits[:, -1].argmax(dim=-1, keepdim=True).to(torch.int)


@dataclasses.dataclass
class GptFast:
    """gpt-fast's model on our weights, its caches sized once for prompt + new tokens, its decode step."""

    model: torch.nn.Module
    args: object
    config_name: str | None
    commit: str | None
    device: torch.device
    prefill_chunk: int | None  # None: a prompt in one forward
    decode: Callable
    compiled: bool

    @staticmethod
    def build(root: Path, checkpoint: Path, dtype: torch.dtype, device, context: int, compile: bool = True) -> GptFast:
        reader = CheckpointReader(checkpoint)
        cfg = reader.config
        module = import_model_file(root, cfg.is_moe)
        args = model_args(module, cfg, context)
        device = torch.device(device)
        with torch.device("meta"):
            model = module.Transformer(args)
        state = gpt_fast_tensors(reader, None, dtype, device)
        for layer in range(cfg.n_layers):
            state.update(gpt_fast_tensors(reader, layer, dtype, device))
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model = model.eval()
        with torch.device(device):  # as its generate.py: caches, rotary table and mask made on the device
            model.setup_caches(max_batch_size=1, max_seq_length=context)
        if model.freqs_cis.dtype != dtype:  # a float32 run (its Mixtral file keeps caches and table in bf16)
            model.freqs_cis = _freqs_cis(args, dtype).to(device)
            for block in model.layers:
                cache = block.attention.kv_cache
                shape = cache.k_cache.shape
                with torch.device(device):
                    block.attention.kv_cache = module.KVCache(shape[0], shape[2], shape[1], shape[3], dtype)
        decode = (
            torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compile else decode_one_token
        )
        chunk = MOE_PREFILL_CHUNK if cfg.is_moe else None
        return GptFast(model, args, named_config(module, args), checkout_commit(root), device, chunk, decode, compile)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """The prompt through the model (eager, in chunks for the Mixtral): the last position's logits (vocab,)."""
        ids = torch.tensor([prompt], dtype=torch.int, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        step = self.prefill_chunk or len(prompt)
        for start in range(0, len(prompt), step):
            logits = self.model(ids[:, start : start + step], positions[start : start + step])
        return logits[0, -1]

    @torch.no_grad()
    def generate(self, prompt: list[int], n: int, clock: bool = True) -> tuple[list[int], list[float]]:
        """Greedy: `n` tokens after `prompt`, and the clock read after each token (after the first and the last
        without `clock`), the device synchronised before each reading."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def now() -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        with torch._inductor.config.patch(INDUCTOR_FLAGS):
            token = self.prefill(prompt).argmax().view(1, 1).to(torch.int)
            tokens, times = [token], [now()]
            input_pos = torch.tensor([len(prompt)], dtype=torch.int, device=self.device)
            with sdpa_kernel(SDPBackend.MATH):  # as its decode_n_tokens: inductor generates the attention
                for i in range(n - 1):
                    token = self.decode(self.model, token.view(1, -1), input_pos).clone()
                    input_pos += 1
                    tokens.append(token)
                    if clock or i == n - 2:
                        times.append(now())
        return [int(t) for t in torch.cat(tokens).flatten().tolist()], times


def measure(
    peer: GptFast,
    prompts_for: Callable[[int, int], torch.Tensor],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    limit: dict,
) -> dict:
    """Batch-1 decode as gpu_scale measures ours: a warm-up, a call that records the graph, the time of one token,
    then `repeats` calls of `new_tokens`, each decode step timed (the clock read after each token, as for
    transformers); the figures checked against `limit` (the one-GPU ceiling). Also its own loop's rate, the clock
    read only after the first and last token (how gpt-fast times itself)."""
    t0 = time.perf_counter()
    peer.generate(prompts_for(1, 16)[0].tolist(), 2)  # compiles
    compile_s = time.perf_counter() - t0
    peer.generate(prompts_for(1, 16)[0].tolist(), RECORD_TOKENS)
    prompt = prompts_for(1, prompt_tokens)[0].tolist()
    t0 = time.perf_counter()
    peer.generate(prompt, 1)
    t1 = time.perf_counter() - t0
    runs, walls = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, times = peer.generate(prompt, new_tokens)
        walls.append(time.perf_counter() - t0)
        runs.append(traces_from_clock(1, times))
    figures = checked_decode_figures("gpt-fast b=1", 1, runs, walls, t1, new_tokens, limit)
    _, (first, last) = peer.generate(prompt, new_tokens, clock=False)
    figures["loop_tokens_per_s"] = (new_tokens - 1) / (last - first)
    return {
        "setup": {
            "commit": peer.commit,
            "config": peer.config_name,
            "decode": "torch.compile(decode_one_token, mode='reduce-overhead', fullgraph=True)"
            if peer.compiled
            else "eager (--gpt-fast-compile off)",
            "inductor_flags": INDUCTOR_FLAGS,
            "prefill_chunk": peer.prefill_chunk,
            "sampling": "greedy argmax",
        },
        "first_call_s": round(compile_s, 1),
        "decode": {"1": figures},
    }

"""A decode step's layers compiled by inductor, for the decode graphs to capture (opt-in: MISTRAL_CLUSTER_COMPILE=1).

At batch 1 a layer costs its weight reads plus ~60 small kernels (norms, rotary, cache writes, masks, gate),
~150 us a layer inside a CUDA graph, and the attention projections run as cuBLAS split-K GEMVs well below the
bandwidth (bench/NOTES.md). Here each layer's work up to its experts is one function compiled by inductor: the
residual add, RMSNorm, one GEMM for q, k and v, rotary, the output projection, the residual, the second norm and
the gate's top-k (a dense layer: its SwiGLU too). Mode `max-autotune-no-cudagraphs` includes coordinate-descent
tuning, under which inductor writes a one-token GEMM as a reduction it tunes to read the weights at full bandwidth
(what gpt-fast relies on). The cache write and the attention over the buffers are one custom op inside it
(`write_and_attend`, the Triton kernel of `shards/decode_attention.py`: inductor wrote that attention 20x slower).
The experts stay outside, as the caller's function (the Triton GEMV in place, or messages to other GPUs);
`DecodeGraphs` then captures the compiled kernels like the eager ones: our CUDA graphs, not inductor's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shards.decode_attention import decode_attention
from shards.kv_cache import RollingKVCache, StepLayout
from shards.layers import apply_rotary, rms_norm
from shards.model import ExpertsFn, TransformerShard

log = logging.getLogger(__name__)


def compile_requested() -> bool:
    """MISTRAL_CLUSTER_COMPILE=1 turns the compiled decode layers on. Off by default: on an H200 they gave Mixtral
    at batch 1 +2.6 % (131.6 against 128.3 tok/s) for 19 s more at every load (bench/NOTES.md, eleventh session),
    inside the pause a restarted worker costs; the eager layers' fused Triton kernels took most of their gain."""
    return os.environ.get("MISTRAL_CLUSTER_COMPILE", "0") == "1"


def compile_batches() -> tuple[int, ...]:
    """The decode batch sizes compiled ahead, MISTRAL_CLUSTER_COMPILE_BATCHES (comma-separated; default 1): each
    is one compilation (about a minute at the real shape on an H200, estimated)."""
    raw = os.environ.get("MISTRAL_CLUSTER_COMPILE_BATCHES", "1")
    try:
        sizes = tuple(sorted({int(b) for b in raw.split(",") if b.strip()}))
    except ValueError:
        raise ValueError(f"MISTRAL_CLUSTER_COMPILE_BATCHES={raw!r}: expected comma-separated batch sizes") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"MISTRAL_CLUSTER_COMPILE_BATCHES={raw!r}: batch sizes must be positive")
    return sizes


@dataclass(frozen=True)
class _DecodeStep:
    """A decode step of `batch` sequences at position 0 of slots 0..batch-1: what the compilation runs on."""

    batch: int
    is_decode: bool = True

    @property
    def slots(self) -> list[int]:
        return list(range(self.batch))

    @property
    def starts(self) -> list[int]:
        return [0] * self.batch

    @property
    def lengths(self) -> list[int]:
        return [1] * self.batch


@torch.library.custom_op("mistral_cluster::write_and_attend", mutates_args=("k_rows", "v_rows"))
def write_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """The decode step's keys and values written into the layer's cache (row position % capacity of each slot's
    buffer) and attention over the buffers in place, in one kernel (`shards.decode_attention`). One opaque op to
    inductor: left to itself it wrote the attention as three split reductions, 111 us a layer at batch 1 on an H200
    against ~5 for the kernel (bench/NOTES.md)."""
    return decode_attention(q, k_rows, v_rows, slots, positions, capacity, capacity, k_new=k, v_new=v)


@write_and_attend.register_fake
def _(q, k, v, k_rows, v_rows, slots, positions, capacity):
    return torch.empty_like(q)


@torch.library.custom_op("mistral_cluster::cublas_linear", mutates_args=())
def cublas_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear` as torch runs it (cuBLAS on a GPU), opaque to inductor. Under coordinate-descent tuning inductor
    writes a one-token GEMM as a reduction: good for q/k/v (fused with the norm, 3.1 TB/s), but the output
    projection ran at 1.35 TB/s (24.8 us a layer against cuBLAS's ~12) and the gate's 8 outputs took 13.8 us
    (cuBLAS ~6): too few outputs for a reduction of 4096 (bench/NOTES.md, `decode_profile`, one H200)."""
    return F.linear(x, weight)


@cublas_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output projection's and the gate's GEMM: cuBLAS (`cublas_linear`), or inductor's own with
    MISTRAL_CLUSTER_COMPILE_CUBLAS=0 (an A/B switch; read when the layers are compiled)."""
    if os.environ.get("MISTRAL_CLUSTER_COMPILE_CUBLAS", "1") == "0":
        return F.linear(x, weight)
    return cublas_linear(x, weight)


def route_by_max(logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`shards.moe.route` as `top_k` max reductions, which inductor fuses with the softmax into one small kernel:
    torch.topk over 8 experts launched two kernels, 8.2 us a layer at batch 1 on an H200. The same ids and weights
    (ties aside: topk's order among equal scores is unspecified, max takes the first)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ids, weights, left = [], [], probs
    for _ in range(top_k):
        w, i = left.max(dim=-1)
        ids.append(i)
        weights.append(w)
        left = left.masked_fill(F.one_hot(i, probs.shape[-1]).bool(), float("-inf"))
    ids_t, w_t = torch.stack(ids, dim=-1), torch.stack(weights, dim=-1)
    return ids_t, (w_t / w_t.sum(dim=-1, keepdim=True)).to(dtype)


def _attention_half(h, ln1, wqkv, wo, ln2, k_rows, v_rows, slots, positions, cos, sin, dims):
    """`DecoderLayer.forward` up to the feed-forward, for one decode token per sequence: (h, the normed input of
    the feed-forward). k_rows, v_rows: the layer's cache, written in place. Every buffer's rows are in the grid
    (`capacity`, not the step's span: a span would be a compile each); the kernel reads only the filled ones."""
    n_heads, n_kv, head_dim, capacity, eps = dims
    tokens = h.shape[0]
    x = rms_norm(h, ln1, eps)
    q, k, v = F.linear(x, wqkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = apply_rotary(q.view(tokens, n_heads, head_dim), cos, sin)
    k = apply_rotary(k.view(tokens, n_kv, head_dim), cos, sin)
    v = v.view(tokens, n_kv, head_dim)
    out = write_and_attend(q, k, v, k_rows, v_rows, slots, positions, capacity)
    h = h + _linear(out.reshape(tokens, n_heads * head_dim), wo)
    return h, rms_norm(h, ln2, eps)


def _moe_layer(h, y, ln1, wqkv, wo, ln2, gate, k_rows, v_rows, slots, positions, cos, sin, dims, top_k):
    """The last layer's expert sum `y` added, then this layer up to its experts: (h, x, expert ids, weights)."""
    h, x = _attention_half(h + y, ln1, wqkv, wo, ln2, k_rows, v_rows, slots, positions, cos, sin, dims)
    ids, weights = route_by_max(_linear(x, gate), top_k, x.dtype)
    return h, x, ids, weights


def _dense_layer(h, ln1, wqkv, wo, ln2, w13, w2, k_rows, v_rows, slots, positions, cos, sin, dims):
    """A whole Mistral layer: attention, then SwiGLU with gate and up in one GEMM."""
    h, x = _attention_half(h, ln1, wqkv, wo, ln2, k_rows, v_rows, slots, positions, cos, sin, dims)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w2)


def compile_mode(device: torch.device) -> str:
    """Autotuned Triton on GPUs; on CPU (tests) inductor's default C++ code, which compiles faster."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"


class CompiledDecode:
    """The decode steps of one shard's layers through one compiled function per layer kind, eager where it cannot."""

    def __init__(self, shard: TransformerShard, cache: RollingKVCache, batches: tuple[int, ...] = (1,)) -> None:
        cfg = shard.config
        self.shard, self.cache, self.moe = shard, cache, cfg.is_moe
        self.batches = tuple(b for b in batches if b <= cache.max_seqs)
        self.compiled: tuple[int, ...] = ()  # the batch sizes `warm_up` compiled
        self.error: str | None = None  # why compiling failed
        self.warm_up_s = 0.0
        self.weights: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer in shard.layers.values():
            common = (
                layer.input_layernorm.weight,
                layer.self_attn.fuse_qkv(),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
            )
            ffn = (
                (layer.block_sparse_moe.gate.weight,)
                if self.moe
                else (layer.mlp.fuse_gate_up(), layer.mlp.down_proj.weight)
            )
            self.weights[layer.layer] = common + ffn
        dims = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.capacity, cfg.norm_eps)
        top_k = cfg.num_experts_per_tok

        def moe(*args):
            return _moe_layer(*args, dims, top_k)

        def dense(*args):
            return _dense_layer(*args, dims)

        device = next(iter(self.weights.values()))[0].device if self.weights else torch.device("cpu")
        self.mode = compile_mode(device)
        self._layer: Callable = torch.compile(moe if self.moe else dense, fullgraph=True, dynamic=False, mode=self.mode)

    def warm_up(self) -> bool:
        """Compile for every batch size now, on a decode step at position 0 of the first slots (rows any sequence
        writes before it reads them). False, logged, when compiling failed: every step then runs eagerly."""
        cfg = self.shard.config
        device = self.cache.k.device
        t0 = time.perf_counter()
        for b in self.batches:
            with torch.inference_mode():  # as a step runs: dynamo's guards tell inference tensors from others
                layout = StepLayout.build(
                    _DecodeStep(b), self.cache.capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, device
                )
                h = torch.zeros(b, cfg.dim, dtype=self.cache.k.dtype, device=device)
                try:
                    self._run(h, layout, self.cache, None)
                except Exception as e:  # noqa: BLE001 - any failure to compile: the eager layers, as before
                    self.error = f"{type(e).__name__}: {e}"[:2000]
                    log.warning("compiling the decode layers failed, they run eagerly: %s", self.error)
                    self.compiled = ()
                    return False
            self.compiled += (b,)
        self.warm_up_s = time.perf_counter() - t0
        return True

    def run_layers(
        self,
        h: torch.Tensor,
        layout: StepLayout,
        cache: RollingKVCache,
        experts: ExpertsFn | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`TransformerShard.run_layers`: compiled for a decode step of a size compiled ahead (every row), else
        eager (only `rows` out of the last layer)."""
        if layout.decode_slots is None or h.shape[0] not in self.compiled:
            return self.shard.run_layers(h, layout, cache, experts, rows)
        if rows is not None:
            raise ValueError("a compiled decode step computes every row: call it without `rows`")
        # Never a compile while serving: were a guard to fail, that call runs the same function eagerly.
        with torch.compiler.set_stance("eager_on_recompile"):
            return self._run(h, layout, cache, experts)

    def _run(self, h: torch.Tensor, layout: StepLayout, cache: RollingKVCache, experts: ExpertsFn | None):
        y = torch.zeros_like(h) if self.moe else None
        for layer in self.shard.layers.values():
            args = (
                *self.weights[layer.layer],
                *cache.layer_rows(layer.layer),
                layout.decode_slots,
                layout.positions,
                layout.cos,
                layout.sin,
            )
            if not self.moe:
                h = self._layer(h, *args)
                continue
            h, x, ids, weights = self._layer(h, y, *args)
            y = (
                layer.block_sparse_moe.experts(x, ids, weights)
                if experts is None
                else experts(layer.layer, x, ids, weights)
            )
        return h + y if self.moe else h

"""RMSNorm and the rotary embedding as one Triton pass each, for the eager layers on a GPU.

Why (issue 18, `shard_profile-prefill-mixed-h200.json`): through a 4k prompt's chunk the eager layers ran RMSNorm as
six passes (a float32 copy, pow, mean, rsqrt's product, the cast back, the weight's product) and the rotary
embedding as five (a concatenated copy for the rotated half, two products, the sum, casts), ~0.4 ms a layer of the
7.35 ms against a ~4.3 ms floor. Each kernel here reads its input once and writes once, rounding where the torch
ops round (`shards.layers.rms_norm`, `apply_rotary`: the functions the compiled decode layers trace, where inductor
fuses them itself, so those stay as they are).
"""

from __future__ import annotations

import os

import torch

from shards.moe import triton_installed


def switch(name: str) -> bool:
    """An on/off environment switch (default on): `0` or `1`, anything else named in the error."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected '0' or '1'")
    return value == "1"


def fused_here(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `x`: on CUDA with Triton, or in Triton's interpreter (tests).
    MISTRAL_CLUSTER_FUSED_ELEMENTWISE=0 keeps torch's ops (an A/B switch)."""
    if not switch("MISTRAL_CLUSTER_FUSED_ELEMENTWISE") or not triton_installed():
        return False
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`shards.layers.rms_norm` over the last dim of a contiguous (..., dim) tensor, in one pass."""
    import triton

    from shards.layer_kernels_triton import rms_norm_kernel

    dim = x.shape[-1]
    src = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = src.numel() // dim
    if rows:
        block = triton.next_power_of_2(dim)
        rms_norm_kernel[(rows,)](src, weight, out, dim, eps, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`shards.layers.apply_rotary`: x (tokens, heads, head_dim) whose heads of a token are contiguous (a projection's
    output viewed by heads); cos, sin (tokens, head_dim) float32."""
    import triton

    from shards.layer_kernels_triton import rotary_kernel

    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        x = x.contiguous()
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if tokens:
        rotary_kernel[(tokens,)](
            x, cos.contiguous(), sin.contiguous(), out, heads, x.stride(0),
            HEADS=triton.next_power_of_2(heads), HEAD_DIM=head_dim, num_warps=4,
        )  # fmt: skip
    return out


def band_merge(
    own: tuple[torch.Tensor, torch.Tensor], pieces: list[tuple[torch.Tensor, torch.Tensor]], seen: int
) -> torch.Tensor:
    """`shards.attention._band_attention`'s merge in one pass: the chunk's attention over its own keys (heads,
    tokens, head_dim) with its log-sum-exp (heads, tokens), and one or two pieces over the cached keys for the
    first `seen` queries in reverse order, (heads, seen, head_dim) each with theirs -> (tokens, heads, head_dim).
    In torch the merge was ~12 passes over float32 copies, the reversal and a concatenation: ~1 ms a layer of a 16k
    prompt's later chunk on an H200 (`shard_profile-band-h200.json`), more than the pieces' attention itself."""
    import triton

    from shards.layer_kernels_triton import band_merge_kernel

    (o, lse), (rev, rev_lse) = own, pieces[0]
    whole, whole_lse = pieces[1] if len(pieces) > 1 else (rev, rev_lse)
    heads, tokens, head_dim = o.shape
    o, rev, whole = (t if t.stride(2) == 1 else t.contiguous() for t in (o, rev, whole))
    out = torch.empty((tokens, heads, head_dim), dtype=o.dtype, device=o.device)
    if tokens:
        band_merge_kernel[(tokens,)](
            o, lse.contiguous(), rev, rev_lse.contiguous(), whole, whole_lse.contiguous(), out,
            tokens, seen, heads, o.stride(0), o.stride(1), rev.stride(0), rev.stride(1), whole.stride(0),
            whole.stride(1), HEADS=triton.next_power_of_2(heads), HEAD_DIM=head_dim, HAS_WHOLE=len(pieces) > 1,
            num_warps=4,
        )  # fmt: skip
    return out

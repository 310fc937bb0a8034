"""The elementwise work around the expert GEMMs, one pass each, in Triton (torch's ops where Triton does not run).

Why (issue 18, `shard_profile-prefill-mixed-h200.json`: a 4k prompt through real-shaped Mixtral layers on an H200):
the grouped GEMMs ran near the tensor cores' peak (4.05 ms a layer), but the passes around them took ~1.2 ms more:
silu over the gate half of a strided (pairs, 2 x hidden) view (0.33 ms), its product with the up half (strided
too, so torch's slow non-vectorised kernel), the routing weights' product, a mask, an index copy back to token
order and the sum over the k choices. Here:

- `silu_mul`: act = silu(gate) * up [* scale per row], reading the GEMM's output once and writing act once;
- `combine_choices`: out[t] = sum over the k choices of weight * y at the pair's row of the expert-sorted output
  (0 for experts held elsewhere), gathering through the inverse permutation: no index copy, no intermediate.

Both round where torch's ops round (silu to the activations' dtype, then the product, then the scale; each weighted
choice, then the float32 sum), so they give the bits the unfused ops gave, up to the last bit of exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shards.layer_kernels import fused_here


def silu_mul(gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: (..., 2 * hidden), gate then up; scale: None or one value per row (the leading dims flattened).
    Returns silu(gate) * up [* scale] as (..., hidden) in gate_up's dtype."""
    hidden = gate_up.shape[-1] // 2
    if not fused_here(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        return act if scale is None else act * scale.view(*act.shape[:-1], 1)
    import triton

    from shards.moe_kernels_triton import silu_mul_kernel

    rows = gate_up.numel() // (2 * hidden)
    src = gate_up.reshape(rows, 2 * hidden)  # a view where the leading dims are contiguous (the GEMMs' outputs)
    if src.stride(1) != 1:
        src = src.contiguous()
    out = torch.empty(rows, hidden, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out.view(*gate_up.shape[:-1], hidden)
    block = 1024
    silu_mul_kernel[(rows, triton.cdiv(hidden, block))](
        src, out, scale if scale is not None else src, hidden, src.stride(0),
        SCALED=scale is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out.view(*gate_up.shape[:-1], hidden)


def combine_choices(
    ys: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    local: torch.Tensor,
    weights: torch.Tensor,
    n_local: int,
) -> torch.Tensor:
    """ys: (pairs, dim), the experts' outputs in expert-sorted order, row i being pair order[i] = token * k + choice
    (`inverse`: pair -> row); local: (tokens, k) each choice's local expert index (n_local where held elsewhere);
    weights: (tokens, k). Returns (tokens, dim): each token's weighted sum over its choices held here, in choice
    order."""
    tokens, k = local.shape
    if not fused_here(ys):
        held = (local.flatten() < n_local).index_select(0, order)
        ys = ys * weights.flatten().index_select(0, order)[:, None]
        ys = torch.where(held[:, None], ys, 0)  # rows of experts held elsewhere: any bits (NaN too), never read
        return ys.new_empty(ys.shape).index_copy_(0, order, ys).view(tokens, k, -1).sum(dim=1)
    import triton

    from shards.moe_kernels_triton import combine_kernel

    dim = ys.shape[1]
    out = torch.empty(tokens, dim, dtype=ys.dtype, device=ys.device)
    if tokens == 0:
        return out
    block = 1024
    combine_kernel[(tokens, triton.cdiv(dim, block))](
        ys.contiguous(), inverse.contiguous(), local.contiguous(), weights.contiguous(), out, dim, n_local,
        K=k, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out

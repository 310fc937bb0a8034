"""Sparse mixture of experts with top-k routing (Mixtral: 8 experts, top-2).

The gate and the experts are separate pieces so that the experts of one layer can live on other GPUs than the
gate: `Gate` runs where the layer's attention runs, `ExpertGroup` runs wherever its experts were placed.

An `ExpertGroup` keeps its experts' weights stacked (Hugging Face's `gate_up_proj` / `down_proj` layout) and runs
them with a fixed number of kernels and no host-device synchronisation per layer, however the gate routed the
tokens. Which kernels depends on the step's size:
- 1-3 tokens on a GPU: a Triton GEMV that reads only the chosen experts (`shards/expert_gemv.py`);
- a decode batch that reaches every expert anyway: every held expert on every token as plain GEMMs with the
  choices as weights (zero for an expert a token did not choose);
- otherwise (prefill, and where Triton is missing): two grouped GEMMs over the (token, choice) pairs sorted by
  expert.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """Router of one MoE layer: logits over experts, keep the top k, softmax over the chosen k."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (tokens, dim) -> expert ids (tokens, k) int64 and weights (tokens, k) in x's dtype."""
        return route(torch.nn.functional.linear(x, self.weight), self.top_k, x.dtype)


def route(logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, experts) gate logits -> the top k expert ids (tokens, k) and their weights (tokens, k) in `dtype`."""
    # softmax over all experts then renormalise over the chosen k == softmax over the chosen k logits
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(dtype)


def grouped_mm_supported(x: torch.Tensor, hidden_dim: int) -> bool:
    """Whether `torch._grouped_mm` runs these experts here without a host sync.

    On CUDA only bf16 has a grouped kernel (Hopper and later); other dtypes take a fallback that copies the
    offsets to the host. Two-byte dtypes need rows aligned to 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (hidden_dim * x.element_size()) % 16 == 0


def experts_capturable(dim: int, hidden_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode step's experts can go into a CUDA graph here: only where the grouped kernel needs no host
    sync (`grouped_mm_supported`); float32 on CUDA copies offsets to the host. Both sides of an expert dispatch
    (the stage's graphs and the expert server's) ask this, so they capture alike."""
    return grouped_mm_supported(torch.empty(0, dim, dtype=dtype, device=device), hidden_dim)


def dense_max_tokens(holds_every_expert: bool = True) -> int:
    """Most tokens a step may have for the dense path: it multiplies the FLOPs by experts / top-k, which a decode
    batch hides behind reading the weights and a prefill chunk does not. A group holding only some of a layer's
    experts stops at 32: on two H200s at 128 tokens its grouped GEMMs beat dense by 10 % (3267 vs 2986 tok/s) where
    one GPU holding all eight loses 11 % with them (2528 vs 2853; bench/NOTES.md).
    MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS overrides both (0 turns the dense path off)."""
    override = os.environ.get("MISTRAL_CLUSTER_DENSE_EXPERTS_MAX_TOKENS")
    if override is not None:
        return int(override)
    return 128 if holds_every_expert else 32


def gemv_max_tokens() -> int:
    """Most tokens a step may have for the Triton GEMV, which reads each chosen expert once per (token, choice) pair:
    up to 3 tokens it beats the grouped GEMMs on an H200 (bench/NOTES.md), and from 4 the dense path takes over.
    MISTRAL_CLUSTER_EXPERT_GEMV_MAX_TOKENS overrides it (0 turns the GEMV off)."""
    return int(os.environ.get("MISTRAL_CLUSTER_EXPERT_GEMV_MAX_TOKENS", "3"))


def gemv_supported(x: torch.Tensor) -> bool:
    """The GEMV runs where Triton compiles for the device: CUDA with Triton installed."""
    return x.device.type == "cuda" and triton_installed()


@functools.cache
def triton_installed() -> bool:
    """Whether Triton imports here (the expert GEMV and the decode attention kernel need it)."""
    try:
        import triton  # noqa: F401 - Triton is optional (a test extra); this probe is how we find out
    except ImportError:
        return False
    return True


def sort_by_expert(local: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs grouped by local expert, pairs of experts held elsewhere (`n_local`) last, each
    expert's pairs in their original order: `order` (sorted position -> pair), its inverse (pair -> sorted position)
    and `offs` (n_local,) int32, the end of each held expert's rows. The same order as a stable `torch.sort`, as a
    counting sort of a few small kernels: the radix sort and the search after it took ~70 us a layer of a 4k prompt on
    an H200 (`shard_profile-prefill-fused-h200.json`), for 8k pairs over 8 experts."""
    pairs = local.shape[0]
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long, device=local.device)
        return empty, empty, torch.zeros(n_local, dtype=torch.int32, device=local.device)
    experts = torch.arange(n_local + 1, device=local.device)
    # One running count over the (expert, pair) one-hot laid out expert-major: at (e, p) it is every pair of the
    # experts before e plus e's pairs up to p, i.e. one past pair p's sorted position when p chose e. One 1-D scan:
    # a scan along the pairs of a (pairs, experts) one-hot took 1.45 ms a layer of a 4k prompt on an H200 (torch's
    # outer-dimension scan keeps a few threads per column; `shard_profile-later-chunk-split-h200.json`).
    running = (local[None, :] == experts[:, None]).view(-1).cumsum(0).view(n_local + 1, pairs)
    inverse = running.gather(0, local[None, :])[0] - 1
    ends = running[:, -1]
    order = torch.empty_like(inverse).scatter_(0, inverse, torch.arange(pairs, device=local.device))
    return order, inverse, ends[:n_local].to(torch.int32)


class ExpertGroup(nn.Module):
    """Some of one layer's experts, as stacked SwiGLU weights. Runs only on the tokens that chose them."""

    def __init__(self, dim: int, hidden_dim: int, expert_ids: list[int], num_experts: int) -> None:
        super().__init__()
        self.expert_ids = sorted(expert_ids)
        if self.expert_ids and not (0 <= self.expert_ids[0] and self.expert_ids[-1] < num_experts):
            raise ValueError(f"expert ids {self.expert_ids} out of range for {num_experts} experts")
        self.num_experts, self.hidden_dim = num_experts, hidden_dim
        n = len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * hidden_dim, dim))  # per expert cat(w1 gate, w3 up) rows
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden_dim))  # per expert down projection
        self._tables: dict[torch.device, torch.Tensor] = {}

    def load_experts(
        self, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype | None, device: torch.device | str
    ) -> None:
        """Stack `{prefix}{e}.w1/w3/w2.weight` of the held experts into w13/w2, popping each from `tensors`.

        Each expert's tensors are freed as soon as they are copied in, so loading needs one layer's experts extra.
        """
        if self.expert_ids:
            first = tensors[f"{prefix}{self.expert_ids[0]}.w1.weight"]
            dtype, device = first.dtype, first.device
        like = {"dtype": dtype or torch.float32, "device": device}
        w13 = torch.empty(self.w13.shape, **like)
        w2 = torch.empty(self.w2.shape, **like)
        h = self.hidden_dim
        for i, e in enumerate(self.expert_ids):
            w13[i, :h].copy_(tensors.pop(f"{prefix}{e}.w1.weight"))
            w13[i, h:].copy_(tensors.pop(f"{prefix}{e}.w3.weight"))
            w2[i].copy_(tensors.pop(f"{prefix}{e}.w2.weight"))
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self._local_index(w13.device)  # made now: a host-to-device copy, kept out of the first forward

    def _local_index(self, device: torch.device) -> torch.Tensor:
        """The global expert id -> local index table, with `n_local` for experts not held (made once a device)."""
        if device not in self._tables:
            n = len(self.expert_ids)
            table = torch.full((self.num_experts,), n, dtype=torch.long)
            table[self.expert_ids] = torch.arange(n)
            self._tables[device] = table.to(device)
        return self._tables[device]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (tokens, dim); ids, weights: (tokens, k). Returns the weighted sum over this group's chosen experts.

        Choices of experts outside the group contribute nothing here; another group adds them.
        """
        if self.expert_ids and ids.shape[0] <= gemv_max_tokens() and gemv_supported(x):
            return self.forward_gemv(x, ids, weights)
        if self.expert_ids and self.dense_pays(*ids.shape):
            return self.forward_dense(x, ids, weights)
        if grouped_mm_supported(x, self.hidden_dim) and self.expert_ids:
            return self.forward_grouped(x, ids, weights)
        return self.forward_loop(x, ids, weights)

    def dense_pays(self, tokens: int, k: int) -> bool:
        """Dense when each expert expects at least one of the step's choices (so it is read anyway) and the step is
        small enough that the extra FLOPs hide behind the weight reads.

        Measured on H200 (bench/NOTES.md): cuBLAS GEMMs with 32 rows read weights at ~3.8 TB/s, the grouped kernel
        with ~8 rows per expert at ~2.7. A group holding some experts stops sooner (`dense_max_tokens`).
        """
        holds_every_expert = len(self.expert_ids) == self.num_experts
        return tokens * k >= self.num_experts and tokens <= dense_max_tokens(holds_every_expert)

    def forward_dense(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every held expert on every token; the choices weight the SwiGLU activations (0 where not chosen)."""
        from shards.moe_kernels import silu_mul

        tokens, n, h = x.shape[0], len(self.expert_ids), self.hidden_dim
        table = self._local_index(x.device)
        # (tokens, n) routing weight per held expert; column n collects choices of experts held elsewhere.
        dense = torch.zeros(tokens, n + 1, dtype=weights.dtype, device=x.device).scatter_(1, table[ids], weights)
        gate_up = F.linear(x, self.w13.view(n * 2 * h, -1)).view(tokens, n, 2 * h)
        act = silu_mul(gate_up, dense[:, :n].flatten())  # (tokens, n, hidden)
        return torch.bmm(act.transpose(0, 1), self.w2.transpose(1, 2)).sum(dim=0)  # (n, tokens, dim) -> (tokens, dim)

    def forward_gemv(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The Triton GEMV over the chosen experts."""
        from shards.expert_gemv import expert_gemv  # imports Triton: optional, and only needed where this runs

        table = self._local_index(x.device)
        return expert_gemv(x, table[ids], weights, self.w13, self.w2)

    def forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from shards.moe_kernels import combine_choices, silu_mul  # imports this module: bound here, not at the top

        tokens, k = ids.shape
        n_local = len(self.expert_ids)
        table = self._local_index(x.device)
        local = table[ids].flatten()  # (tokens * k,) local expert of each (token, choice) pair, n_local: not here
        order, inverse, offs = sort_by_expert(local, n_local)
        xs = x.index_select(0, order // k)  # (tokens * k, dim)
        act = silu_mul(torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs))
        ys = torch._grouped_mm(act, self.w2.transpose(-2, -1), offs=offs)  # (tokens * k, dim)
        # Rows past offs[-1] belong to experts not held: the kernel leaves them unwritten (any bits, NaN too), and
        # the combine reads none of them. Back to (token, choice) order, summed over the k choices in choice order:
        # no atomics, the same sum order every run.
        return combine_choices(ys, order, inverse, local.view(tokens, k), weights, n_local)

    def forward_loop(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One expert at a time (a host sync per expert on GPU): the reference, and the path without grouped GEMM."""
        out = torch.zeros_like(x)
        for i, expert_id in enumerate(self.expert_ids):
            token_idx, choice = torch.nonzero(ids == expert_id, as_tuple=True)
            if token_idx.numel():
                gate, up = F.linear(x[token_idx], self.w13[i]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.w2[i])
                out.index_add_(0, token_idx, y * weights[token_idx, choice][:, None])
        return out

    def tokens_per_expert(self, ids: torch.Tensor) -> torch.Tensor:
        """(held experts,) int64 on ids' device: how many tokens chose each held expert. Read it when convenient."""
        table = self._local_index(ids.device)
        local = table[ids].flatten()
        counts = torch.zeros(len(self.expert_ids) + 1, dtype=torch.long, device=ids.device)
        return counts.scatter_add_(0, local, torch.ones_like(local))[:-1]

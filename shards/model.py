"""The decoder, as shards: any contiguous run of layers, with or without the embedding, head and experts.

The whole model is the shard that holds everything. A pipeline stage holds some layers' attention, norms and
gates; where its experts live elsewhere, the caller passes an `experts` function that takes the gate's choices
to them and brings back the weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from shards.checkpoint import CheckpointReader, ShardSelection
from shards.config import ModelConfig
from shards.kv_cache import RollingKVCache, StepLayout
from shards.layers import Attention, FeedForward, RMSNorm
from shards.moe import ExpertGroup, Gate

# (layer, normed hidden (tokens, dim), expert ids (tokens, k), weights (tokens, k)) -> (tokens, dim)
ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCORE_BLOCK = 256  # rows scored at once: (256, vocab) float32 log-probabilities at a time


class MoEBlock(nn.Module):
    """Mixtral's feed-forward: the gate here, and whichever of the layer's experts this shard holds."""

    def __init__(self, config: ModelConfig, expert_ids: list[int]) -> None:
        super().__init__()
        self.gate = Gate(config.dim, config.num_experts, config.num_experts_per_tok)
        self.experts = ExpertGroup(config.dim, config.hidden_dim, expert_ids, config.num_experts)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, expert_ids: list[int], attention_backend: str) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config.dim, config.n_heads, config.n_kv_heads, config.head_dim, attention_backend)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        if config.is_moe:
            self.block_sparse_moe = MoEBlock(config, expert_ids)
        else:
            self.mlp = FeedForward(config.dim, config.hidden_dim)

    def forward(
        self,
        h: torch.Tensor,
        layout: StepLayout,
        cache: RollingKVCache,
        experts: ExpertsFn | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, x = self.attend(h, layout, cache, rows)
        if not len(h):  # no row is read (a chunk before a prompt's last): its keys are in the cache, that is all
            return h
        if not hasattr(self, "block_sparse_moe"):
            return h + self.mlp(x)
        ids, weights = self.block_sparse_moe.gate(x)
        if experts is None:
            return h + self.block_sparse_moe.experts(x, ids, weights)
        return h + experts(self.layer, x, ids, weights)

    def attend(
        self, h: torch.Tensor, layout: StepLayout, cache: RollingKVCache, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its feed-forward: (h with attention added, the feed-forward's normed input). With `rows`,
        every token's keys and values still go to the cache, but only those rows go on."""
        attended = self.self_attn(self.input_layernorm(h), self.layer, layout, cache, rows)
        h = (h if rows is None else h[rows]) + attended
        return h, self.post_attention_layernorm(h)


class ExpertDispatch(Protocol):
    """A MoE layer's experts in two calls, for two halves of a step in flight at once: `begin` sends the tokens to
    the experts held elsewhere, `end` computes the local ones and adds the far answers: (tokens, dim)."""

    def begin(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> object: ...

    def end(self, begun: object) -> torch.Tensor: ...


class TransformerShard(nn.Module):
    """The part of the model one process holds, built empty and filled from the checkpoint by selection."""

    def __init__(self, config: ModelConfig, selection: ShardSelection, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.selection = selection
        if selection.embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(config, i, list(selection.experts.get(i, ())), attention_backend)
                for i in selection.layers
            }
        )
        if selection.final_norm:
            self.norm = RMSNorm(config.dim, config.norm_eps)
        if selection.head:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    @staticmethod
    def from_checkpoint(
        reader: CheckpointReader,
        selection: ShardSelection,
        dtype: torch.dtype,
        device: str | torch.device,
        attention_backend: str = "auto",
    ) -> TransformerShard:
        with torch.device("meta"):
            shard = TransformerShard(reader.config, selection, attention_backend)
        tensors = reader.load(selection, dtype=dtype, device=device)
        for i, layer in shard.layers.items():
            if hasattr(layer, "block_sparse_moe"):
                prefix = f"model.layers.{i}.block_sparse_moe.experts."
                layer.block_sparse_moe.experts.load_experts(tensors, prefix, dtype, device)
        # strict=False: the stacked experts are already in place; `_check_loaded` catches anything left empty.
        unexpected = shard.load_state_dict(_module_names(tensors), strict=False, assign=True).unexpected_keys
        if unexpected:
            raise KeyError(f"checkpoint tensors this shard has no place for: {unexpected[:3]}")
        _check_loaded(shard)
        for layer in shard.layers.values():  # one GEMM for q, k and v (and gate with up): their params become views
            layer.self_attn.fuse_qkv()
            if hasattr(layer, "mlp"):
                layer.mlp.fuse_gate_up()
        return shard.eval()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    def run_layers(
        self,
        h: torch.Tensor,
        layout: StepLayout,
        cache: RollingKVCache,
        experts: ExpertsFn | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step through this shard's layers. `rows`: the only rows of the output anyone reads (a last stage's
        rows that want logits or scores), returned in that order: the last layer computes every token's keys and
        values for the cache, and nothing after its attention for the other rows. A 4k prompt's first token
        spends 1/32 of its time on the last layer's feed-forward, of which it needs one row."""
        last = len(self.layers) - 1
        if rows is not None and last < 0:  # a stage of no layers (the head alone)
            return h[rows]
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, layout, cache, experts, rows if i == last else None)
        return h

    def run_layers_overlapped(
        self, h: torch.Tensor, layout: StepLayout, cache: RollingKVCache, dispatch: ExpertDispatch, split: int
    ) -> torch.Tensor:
        """A decode step's rows as two halves (`split` rows, then the rest) interleaved layer by layer: attention of
        the first half, its tokens sent to the far experts, attention of the second half, its tokens sent, then each
        half's local experts and far answers. The far workers compute the first half while this one attends the
        second ("two-batch overlap"). The same function as `run_layers` on every row: only the order differs."""
        layouts = (layout.decode_rows(0, split), layout.decode_rows(split, h.shape[0]))
        parts = [h[:split], h[split:]]
        for layer in self.layers.values():
            begun = []
            for i, part_layout in enumerate(layouts):
                parts[i], x = layer.attend(parts[i], part_layout, cache)
                ids, weights = layer.block_sparse_moe.gate(x)
                begun.append(dispatch.begin(layer.layer, x, ids, weights))
            parts = [part + dispatch.end(b) for part, b in zip(parts, begun, strict=True)]
        return torch.cat(parts)

    def logits(self, h: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """`float32=False` leaves them in the weights' dtype (the values are the same: the head computes in that
        dtype), half the bytes for a shard to send back."""
        out = self.lm_head(self.norm(h))
        return out.float() if float32 else out

    def scores(self, h: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of `h`: the log-probability of its target token under the head, and the `k` most likely tokens
        (ids, log-probabilities; best first). A prompt's own log-probabilities, without a full-vocabulary row
        leaving the device; a block of rows at a time bounds the float32 log-softmax's memory."""
        blocks = range(0, h.shape[0], SCORE_BLOCK) or range(1)  # no rows: one empty block, for the shapes
        parts = [score_logits(self.logits(h[i : i + SCORE_BLOCK]), targets[i : i + SCORE_BLOCK], k) for i in blocks]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def score_logits(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, vocab) logits -> each row's target log-probability (rows,), and its `k` most likely tokens' ids and
    log-probabilities (rows, k), computed in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, targets[:, None])[:, 0], top.indices, top.values


class ExpertShard(nn.Module):
    """Experts of some layers, held apart from the layers' attention and gates (an expert-group actor's model)."""

    def __init__(self, config: ModelConfig, selection: ShardSelection) -> None:
        super().__init__()
        self.config = config
        rows = selection.expert_rows(config)  # every held expert's hidden rows, or a part of them (`hidden_rows`)
        self.groups = nn.ModuleDict(
            {
                str(layer): ExpertGroup(config.dim, rows.stop - rows.start, list(ids), config.num_experts)
                for layer, ids in selection.experts.items()
            }
        )

    @staticmethod
    def from_checkpoint(
        reader: CheckpointReader, selection: ShardSelection, dtype: torch.dtype, device: str | torch.device
    ) -> ExpertShard:
        with torch.device("meta"):
            shard = ExpertShard(reader.config, selection)
        tensors = reader.load(selection, dtype=dtype, device=device)
        for layer, group in shard.groups.items():
            group.load_experts(tensors, f"model.layers.{layer}.block_sparse_moe.experts.", dtype, device)
        if tensors:
            raise KeyError(f"checkpoint tensors outside the expert selection: {sorted(tensors)[:3]}")
        _check_loaded(shard)
        return shard.eval()

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.groups[str(layer)](x, ids, weights)


def _module_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> this module's parameter names (layers are keyed by their global index)."""
    return {name.removeprefix("model."): t for name, t in tensors.items()}


def _check_loaded(shard: nn.Module) -> None:
    """Every parameter was filled from the checkpoint (the experts were stacked first, the rest assigned by name)."""
    missing = [name for name, p in shard.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"parameters missing from the checkpoint: {missing[:3]}")

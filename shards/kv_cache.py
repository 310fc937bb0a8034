"""Rolling-buffer KV cache and the per-step layout that indexes it.

Each sequence owns one *slot*: per layer, `capacity` key/value rows. With a sliding window the capacity is the
window and position `p` lives in row `p mod window`, so a sequence of any length uses at most `window` rows per
layer (Mistral's rolling buffer). Without a window the capacity is the longest context and nothing rolls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shards.attention import AttentionPlan, AttnBias, decode_bias, prefill_bias
from shards.host_copy import to_device
from shards.layers import rotary_cos_sin


def cache_capacity(window: int | None, max_seq_len: int) -> int:
    """Rows per slot: the window (rolling buffer), or the whole context when the model has no window."""
    return min(window, max_seq_len) if window else max_seq_len


# A decode step reads at least this many rows of each buffer, and spans above it come in this many sizes an octave
# (`decode_span`). The defaults make two spans out of a 64 -> 320-token context where a quarter-octave from 64 made ten.
DECODE_SPAN_FLOOR = int(os.environ.get("MISTRAL_CLUSTER_DECODE_SPAN_FLOOR", "256"))
DECODE_SPANS_PER_OCTAVE = int(os.environ.get("MISTRAL_CLUSTER_DECODE_SPANS_PER_OCTAVE", "2"))


def decode_span(
    longest: int, capacity: int, floor: int = DECODE_SPAN_FLOOR, per_octave: int = DECODE_SPANS_PER_OCTAVE
) -> int:
    """How many leading rows of each sequence's buffer a decode step reads: the batch's longest filled length, at
    least `floor`, rounded up to a multiple of 1/`per_octave` of the power of two below it (and of 64 rows). Until a
    buffer wraps, its rows are filled from the first, so the rows past the longest are empty for every sequence.

    Why not the exact length: CUDA graphs are keyed by the span, and a new span costs a step that runs eagerly and
    captures, ~190 ms against a 34-45 ms replay on an H200 (the served Mixtral's ITL p99 went from 44 to 223 ms when
    spans came in, at a quarter octave from 64 rows: ten captures as a context grows to 320). Reading too many rows
    costs little by comparison: ~8 us a row a step at batch 128, so a floor of 256 rows costs ~1.6 ms on a step whose
    context is 64 (bench/NOTES.md). Why not the whole capacity: that read cost the served Mixtral (capacity 1024,
    ~200 tokens of context) ~7 ms of its ~54 ms step at batch 128.

    `MISTRAL_CLUSTER_DECODE_SPAN_FLOOR=64 MISTRAL_CLUSTER_DECODE_SPANS_PER_OCTAVE=4` gives the spans before (212652d).
    """
    if longest <= floor:
        return min(capacity, floor)
    granule = max(64, (1 << (longest.bit_length() - 1)) // per_octave)
    return min(capacity, -(-longest // granule) * granule)


class PackedStep(Protocol):
    """What a shard reads of the router's step plan (`router.step.StepPlan`, which the model cannot import: the
    router sits above it): for each sequence, a run of new tokens at its cache slot."""

    slots: Sequence[int]  # cache slot of each sequence
    starts: Sequence[int]  # position of the first new token = tokens already in the cache
    lengths: Sequence[int]  # new tokens of each sequence

    @property
    def is_decode(self) -> bool: ...


@dataclass
class StepLayout:
    """Everything about a step that is the same for every layer: positions, rotary tables, cache indexes, mask."""

    positions: torch.Tensor  # (tokens,) absolute position of each new token
    cos: torch.Tensor  # (tokens, head_dim)
    sin: torch.Tensor  # (tokens, head_dim)
    write_rows: torch.Tensor  # (tokens,) flat cache row (slot * capacity + pos % capacity) of each new token
    bias: AttnBias | None  # None: a mixed step's `split` (its parts have theirs), or half of a decode step
    attention: AttentionPlan | None  # the torch kernel's view of `bias`, built once for every layer
    decode_slots: torch.Tensor | None  # decode step: keys are these slots' buffers, used in place
    decode_range: slice | None  # the same slots when they are one ascending run: read as a view, no gather
    decode_span: int | None  # decode step: leading rows of each buffer read (`decode_span`), not all `capacity`
    read_rows: torch.Tensor | None  # prefill step: flat cache rows of the cached keys, in position order
    read_dst: torch.Tensor | None  # where those cached keys go in the packed key tensor
    new_dst: torch.Tensor | None  # where the new keys go in the packed key tensor
    n_keys: int
    split: MixedSplit | None = None  # a mixed step: its leading decode rows read their buffers in place

    def decode_rows(self, lo: int, hi: int) -> StepLayout:
        """Sequences lo..hi-1 of a decode step, as views of this layout's tensors (a graph's static buffers stay
        the ones read): what a half of a two-batch-overlapped step attends with. Only the torch kernels' view of
        the mask comes along (the xformers mask object is the whole step's)."""
        if self.decode_slots is None:
            raise ValueError("only a decode step's rows can be taken apart")
        run = self.decode_range
        return StepLayout(
            positions=self.positions[lo:hi],
            cos=self.cos[lo:hi],
            sin=self.sin[lo:hi],
            write_rows=self.write_rows[lo:hi],
            bias=None,
            attention=AttentionPlan(None, None, self.attention.decode_mask[lo:hi]),
            decode_slots=self.decode_slots[lo:hi],
            decode_range=slice(run.start + lo, run.start + hi) if run is not None else None,
            decode_span=self.decode_span,
            read_rows=None,
            read_dst=None,
            new_dst=None,
            n_keys=(self.decode_span or 0) * (hi - lo),
        )

    @staticmethod
    def build(
        step: PackedStep, capacity: int, window: int | None, head_dim: int, rope_theta: float, device: torch.device
    ) -> StepLayout:
        positions, write_rows = [], []
        for slot, start, n in zip(step.slots, step.starts, step.lengths, strict=True):
            if n <= 0:
                raise ValueError(f"a step must give every sequence at least one token, slot {slot} has {n}")
            if n > capacity:
                raise ValueError(
                    f"a chunk of {n} tokens exceeds the cache capacity {capacity}; prefill in smaller chunks"
                )
            if window is None and start + n > capacity:
                raise ValueError(
                    f"sequence in slot {slot} reaches {start + n} tokens, past the cache capacity {capacity}"
                )
            positions.extend(range(start, start + n))
            write_rows.extend(slot * capacity + p % capacity for p in range(start, start + n))
        pos = torch.tensor(positions, dtype=torch.long)
        cos, sin = rotary_cos_sin(pos, head_dim, rope_theta)
        common = {
            "positions": to_device(pos, None, device),
            "cos": to_device(cos, None, device),
            "sin": to_device(sin, None, device),
            "write_rows": to_device(write_rows, torch.long, device),
        }
        if step.is_decode:
            kv_lens = [min(start + 1, capacity) for start in step.starts]
            first = step.slots[0]
            run = list(step.slots) == list(range(first, first + len(step.slots)))
            span = decode_span(max(kv_lens), capacity)
            return StepLayout(
                **common,
                bias=decode_bias(kv_lens, span),  # over the keys `update_and_read` gives: `span` rows a sequence
                attention=AttentionPlan.for_decode(kv_lens, capacity, device),
                decode_slots=to_device(list(step.slots), torch.long, device),
                decode_range=slice(first, first + len(step.slots)) if run else None,
                decode_span=span,
                read_rows=None,
                read_dst=None,
                new_dst=None,
                n_keys=span * len(kv_lens),
            )
        split = mixed_split(step, capacity, window, head_dim, rope_theta, device)
        if split is not None:  # its parts' layouts are all its layers read: no packed layout of the whole step
            return StepLayout(
                **common,
                bias=None,
                attention=None,
                decode_slots=None,
                decode_range=None,
                decode_span=None,
                read_rows=None,
                read_dst=None,
                new_dst=None,
                n_keys=split.prefill.n_keys,
                split=split,
            )
        read_rows, read_dst, new_dst, kv_lens = [], [], [], []
        offset = 0
        for slot, start, n in zip(step.slots, step.starts, step.lengths, strict=True):
            cached = min(start, capacity)
            read_rows.extend(slot * capacity + p % capacity for p in range(start - cached, start))
            read_dst.extend(range(offset, offset + cached))
            new_dst.extend(range(offset + cached, offset + cached + n))
            kv_lens.append(cached + n)
            offset += cached + n

        def as_long(xs: list[int]) -> torch.Tensor:
            return to_device(xs, torch.long, device)

        bias = prefill_bias(list(step.lengths), kv_lens, window)
        return StepLayout(
            **common,
            bias=bias,
            attention=AttentionPlan.build(bias, device),
            decode_slots=None,
            decode_range=None,
            decode_span=None,
            read_rows=as_long(read_rows),
            read_dst=as_long(read_dst),
            new_dst=as_long(new_dst),
            n_keys=offset,
        )


@dataclass(frozen=True)
class _Rows:
    """Some of a step's sequences (`PackedStep`), for the layouts of a mixed step's two parts."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.lengths)


@dataclass
class MixedSplit:
    """A step that carries new prompts beside running sequences, its running ones first (the scheduler's order):
    the first `rows` tokens, one a sequence, attend through the decode kernel over their buffers in place (`decode`),
    the rest through the packed path (`prefill`) over only their own keys. In one packed path the running sequences'
    cached rows were gathered into the packed keys every layer (112 sequences x 300 rows: index_put and gathers,
    0.55 ms a layer on an H200, `shard_profile-prefill-mixed-h200.json`) and padded into a group of their own."""

    rows: int
    decode: StepLayout
    prefill: StepLayout


def padded_decode(step: PackedStep, rows: int, slot: int) -> _Rows:
    """A decode step grown to `rows` sequences by extra ones at `slot` (a scratch slot no sequence owns), each at
    position 0: they write their key and value to that slot's first row and read only it, and their outputs are
    dropped (`shards.decode_graphs.padded_batch`)."""
    extra = rows - len(step.slots)
    if extra < 0 or not step.is_decode:
        raise ValueError(f"only a decode step can be padded, to at least its {len(step.slots)} rows; asked {rows}")
    return _Rows(
        tuple(step.slots) + (slot,) * extra, tuple(step.starts) + (0,) * extra, tuple(step.lengths) + (1,) * extra
    )


def mixed_split(
    step: PackedStep, capacity: int, window: int | None, head_dim: int, theta: float, device
) -> MixedSplit | None:
    """The split of a mixed step (`MixedSplit`), where the decode kernel runs on `device` and the step's leading
    sequences take one token each with at least one longer sequence after them; else None.
    MISTRAL_CLUSTER_SPLIT_MIXED=0 keeps the whole step on the packed path (an A/B switch)."""
    from shards.decode_attention import decodes_in_place
    from shards.layer_kernels import switch

    if step.is_decode or not switch("MISTRAL_CLUSTER_SPLIT_MIXED"):
        return None
    lengths = list(step.lengths)
    rows = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
    if not decodes_in_place(rows, torch.device(device)):
        return None
    slots, starts = tuple(step.slots), tuple(step.starts)
    decode = StepLayout.build(
        _Rows(slots[:rows], starts[:rows], (1,) * rows), capacity, window, head_dim, theta, device
    )
    rest = _Rows(slots[rows:], starts[rows:], tuple(lengths[rows:]))
    prefill = StepLayout.build(rest, capacity, window, head_dim, theta, device)
    return MixedSplit(rows, decode, prefill)


class RollingKVCache:
    """Keys and values of the layers one shard holds, for `max_seqs` slots of `capacity` rows each.

    Allocated once: memory depends on slots and the window, never on how long a sequence grows. With `scratch`, one
    slot more that no sequence owns: the rows a decode step padded to a captured batch size write and read
    (`shards.decode_graphs.padded_batch`).
    """

    def __init__(
        self,
        layers: list[int],
        max_seqs: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        scratch: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.max_seqs = max_seqs
        self.capacity = capacity
        self.scratch_slot = max_seqs if scratch else None
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        slots = max_seqs + (1 if scratch else 0)
        shape = (len(self.layers), slots * capacity, n_kv_heads, head_dim)  # rows are slot-major
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bytes_per_slot(self) -> int:
        return self.nbytes // (self.max_seqs + (self.scratch_slot is not None))

    def layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values, (slots * capacity, n_kv_heads, head_dim) each, slot-major rows (the scratch
        slot, if any, last)."""
        i = self._index[layer]
        return self.k[i], self.v[i]

    def write_decode(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: StepLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a decode step's keys/values at their rows; the layer's rows, for a kernel that reads them in place."""
        k_rows, v_rows = self.layer_rows(layer)
        k_rows.index_copy_(0, layout.write_rows, k_new)
        v_rows.index_copy_(0, layout.write_rows, v_new)
        return k_rows, v_rows

    def update_and_read(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, layout: StepLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values and return the keys/values the step's queries attend over.

        Decode: each sequence's whole rolling buffer, (seqs, capacity, n_kv_heads, head_dim). Prefill: the packed
        keys, (n_keys, n_kv_heads, head_dim), each sequence's cached window in position order then its new tokens.
        """
        if layout.decode_slots is not None:
            k_rows, v_rows = self.write_decode(layer, k_new, v_new, layout)
            view = (-1, self.capacity) + tuple(k_rows.shape[1:])  # (slots, capacity, n_kv_heads, head_dim)
            span = layout.decode_span or self.capacity
            k_all, v_all = k_rows.view(view)[:, :span], v_rows.view(view)[:, :span]
            if layout.decode_range is not None:
                return k_all[layout.decode_range], v_all[layout.decode_range]
            slots = layout.decode_slots
            return k_all.index_select(0, slots), v_all.index_select(0, slots)
        k_rows, v_rows = self.layer_rows(layer)
        if layout.n_keys == k_new.shape[0]:  # no cached keys (every sequence's first chunk): the keys are the new ones
            k_rows.index_copy_(0, layout.write_rows, k_new)
            v_rows.index_copy_(0, layout.write_rows, v_new)
            return k_new, v_new
        # Prefill: read the cached window in position order *before* this chunk overwrites it.
        keys = k_new.new_empty((layout.n_keys,) + tuple(k_new.shape[1:]))
        values = torch.empty_like(keys)
        keys[layout.read_dst] = k_rows[layout.read_rows]
        values[layout.read_dst] = v_rows[layout.read_rows]
        keys[layout.new_dst] = k_new
        values[layout.new_dst] = v_new
        k_rows.index_copy_(0, layout.write_rows, k_new)
        v_rows.index_copy_(0, layout.write_rows, v_new)
        return keys, values

    def clear(self, slot: int) -> None:
        """Forget a finished sequence (not needed for correctness: a new owner starts at position 0)."""
        rows = slice(slot * self.capacity, (slot + 1) * self.capacity)
        self.k[:, rows].zero_()
        self.v[:, rows].zero_()

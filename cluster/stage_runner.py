"""A pipeline stage inside a worker: some layers' attention, norms and gates (plus embedding or head at the ends),
their KV cache, and the MoE dispatch to wherever the layers' experts live. No Ray here: the worker's stage loop
calls `run` once per step plan.

Stage k takes micro-batch m from stage k-1 (or embeds it), runs its layers, and hands it on with a non-blocking
send, so it is already on micro-batch m+1 while stage k+1 works on m. The last stage picks the greedy rows' tokens
on the device and returns them with the logits of the rows the router samples, and the scores of the rows the
plan scores (an echoed prompt's own log-probabilities: per row a target's and the top few, never a full row).

MoE dispatch, per layer: the expert groups held by this worker are computed in place; every other worker holding
experts of the layer gets one message (activations, expert ids and weights packed, every token of the micro-batch:
a fixed size, so no host sync decides who gets what) and sends one back (its groups' weighted sum). The remote
groups compute while the local ones do. Partial sums are added in worker order, the same on every step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from cluster.step_wire import encode_result
from cluster.transport import Channel, LocalPipe, Transport, tally, waiting_on_peer
from cluster.workers import WorkerMap
from router.pipeline import split_microbatches
from router.step import FED_BACK, MicrobatchSpan, StageResult, StepPlan
from shards.checkpoint import CheckpointReader
from shards.compiled_decode import CompiledDecode, compile_batches, compile_requested
from shards.decode_graphs import EXACT_UP_TO, DecodeGraphs, pad_decode, padded_batch
from shards.engine import kept_positions, read_rows
from shards.host_copy import to_device
from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity, padded_decode
from shards.model import ExpertShard, TransformerShard
from shards.moe import experts_capturable


def pack_for_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(tokens, dim + 2k) in x's dtype: activations, expert ids (exact: bf16 holds integers up to 256), weights."""
    return torch.cat([x, ids.to(x.dtype), weights.to(x.dtype)], dim=1)


def unpack_for_experts(packed: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activations as a contiguous copy: a view of the packed rows has a row stride of dim + 2k elements (8200
    bytes at Mixtral's shape), not 16-byte aligned, and cuBLAS then picks an align-2 kernel: on an H200 the expert
    group's gate/up GEMM at 32 tokens took 361 us on the view against 233 on a copy (transport-moe-h200-profile.json),
    where the copy costs ~2 us."""
    return packed[:, :dim].contiguous(), packed[:, dim : dim + k].long(), packed[:, dim + k :]


def local_experts_sum(groups: list[ExpertShard], layer: int, x, ids, weights) -> torch.Tensor | None:
    """The weighted sum of this worker's expert groups of `layer` (in group order), or None when it holds none."""
    out = None
    for g in groups:
        y = g(layer, x, ids, weights)
        out = y if out is None else out + y
    return out


class StageRunner:
    def __init__(
        self,
        reader: CheckpointReader,
        plan,
        index: int,
        workers: WorkerMap,
        local_groups: dict[int, ExpertShard],
        device: torch.device,
        attention_backend: str = "auto",
    ) -> None:
        self.config = config = reader.config
        self.plan, self.index, self.workers, self.device = plan, index, workers, device
        self.n_stages = len(plan.stages)
        self.first, self.last = index == 0, index == self.n_stages - 1
        self.selection = plan.stage_selection(index, config)
        self.model = TransformerShard.from_checkpoint(
            reader, self.selection, plan.torch_dtype, device, attention_backend
        )
        self.capacity = cache_capacity(config.sliding_window, config.max_seq_len)
        self.rank = workers.of_stage(index).index
        self.has_groups = bool(plan.expert_groups)
        # Per MoE layer: this worker's groups of it (group order), and the other workers holding some of its experts.
        self.local_groups: dict[int, list[ExpertShard]] = {}
        self.remote_ranks: dict[int, list[int]] = {}
        for layer in self.selection.layers:
            holders = [g for g in plan.expert_groups if layer in g.layers]
            self.local_groups[layer] = [local_groups[g.index] for g in holders if g.index in local_groups]
            self.remote_ranks[layer] = sorted({workers.of_group(g.index).index for g in holders} - {self.rank})
        # Decode steps replayed as graphs are padded to captured batch sizes (`padded_batch`) where this stage
        # computes every expert of its layers itself (a far expert group's messages have the plan's sizes) and a step
        # can have more sequences than are captured as they are; the scratch slot is there whether graphs run or not.
        self.pads_decode = pad_decode() and not self.has_remote_experts and plan.max_seqs > EXACT_UP_TO
        self.cache = RollingKVCache(
            list(self.selection.layers),
            plan.max_seqs,
            self.capacity,
            config.n_kv_heads,
            config.head_dim,
            plan.torch_dtype,
            device,
            scratch=self.pads_decode,
        )
        # Tokens per expert per layer, counted on the device at each MoE layer (a statistic adds no host sync). Where
        # decode steps are padded, each count is weighted by `_counted`: 1 for a step's real rows, 0 for its padding
        # (a captured count cannot slice by a size that changes from replay to replay).
        self.load = torch.zeros(config.n_layers, max(config.num_experts, 1), dtype=torch.long, device=device)
        self._experts_per_row = max(config.num_experts_per_tok, 1)
        padded_most = padded_batch(plan.max_seqs) * self._experts_per_row if self.pads_decode else 0
        self._counted = torch.ones(padded_most, dtype=torch.long, device=device) if self.pads_decode else None
        self._counted_rows: int | None = None  # the real rows `_counted` weighs now (refilled only when they change)
        # Channels to the neighbouring stages (a `LocalPipe` where the neighbour is in this worker).
        self.pipe_in: Channel | LocalPipe | None = None
        self.pipe_out: Channel | LocalPipe | None = None
        self.expert_channels: dict[int, Channel] = {}
        self.graphs: DecodeGraphs | None = None
        self.compiled = self._compiled_decode()
        # The last greedy pick of each cache slot, on the device: what a plan's FED_BACK token means (decode ahead,
        # `router.scheduler`). Kept only where the router decodes ahead, by the stage that picks and the one that
        # embeds: elsewhere no step pays for remembering its picks. In a pipeline the last stage sends its table to
        # the first at the start of every step that feeds tokens back (`picks_in`, `picks_out`).
        ahead = plan.scheduling.decode_ahead and (self.first or self.last)
        self.last_picks = torch.zeros(plan.max_seqs, dtype=torch.long, device=device) if ahead else None
        self.picks_in: Channel | None = None
        self.picks_out: Channel | None = None
        self.fed_back = 0  # tokens this stage fed in from its own picks
        self.overlapped = 0  # steps launched before the previous step was waited for (`overlaps_host`)
        self.launched_ahead = 0  # steps launched without waiting, waited for by the worker's deliver thread
        self._expert_seconds = 0.0
        self._previous_done: torch.cuda.Event | None = None  # the last finished step's end (the next one's gap)

    def attach(self, transport: Transport) -> None:
        """Take this stage's channels from a freshly formed process group, and decide on CUDA graphs."""
        before = None if self.first else self.workers.of_stage(self.index - 1).index
        after = None if self.last else self.workers.of_stage(self.index + 1).index
        if before is not None and before != self.rank:
            self.pipe_in = transport.channel("pipe", before, self.rank, self.index - 1)
        if after is not None and after != self.rank:
            self.pipe_out = transport.channel("pipe", self.rank, after, self.index)
        peers = sorted({r for ranks in self.remote_ranks.values() for r in ranks})
        self.expert_channels = {r: transport.channel("experts", self.rank, r, self.index) for r in peers}
        if self.last_picks is not None and not (self.first and self.last):  # a pipeline decoding ahead
            first, last = self.workers.of_stage(0).index, self.workers.of_stage(len(self.plan.stages) - 1).index
            channel = transport.channel("picks", last, first, 0)
            self.picks_in, self.picks_out = (channel, None) if self.first else (None, channel)
        self.graphs = self._decode_graphs()

    def detach(self) -> None:
        """Drop this stage's channels (the process group is being released)."""
        self.pipe_in = self.pipe_out = self.picks_in = self.picks_out = None
        self.expert_channels = {}

    def _compiled_decode(self) -> CompiledDecode | None:
        """MISTRAL_CLUSTER_COMPILE=1: the decode layers compiled by inductor, now, while the worker loads (a compile
        during serving would outlast the step's deadline). Where compiling failed it runs every step eagerly and
        keeps the error, which `ShardWorker.decode_paths` reports."""
        if not compile_requested():
            return None
        compiled = CompiledDecode(self.model, self.cache, compile_batches())
        compiled.warm_up()
        return compiled

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps: the layers' kernels, and the expert dispatch's NCCL messages with them, as one
        launch. Not where a message goes through host memory (that is host work in the middle of a layer).
        MISTRAL_CLUSTER_CUDA_GRAPHS=0 turns them off; =eager replays on the static buffers without CUDA (CPU tests)."""
        mode = os.environ.get("MISTRAL_CLUSTER_CUDA_GRAPHS", "1")
        if mode == "0":
            return None
        if mode == "eager":
            return DecodeGraphs(self.model, self.cache, replay="eager", run_layers=self._run_layers)
        if self.device.type != "cuda" or any(ch.via_host for ch in self.expert_channels.values()):
            return None
        capturable = experts_capturable(self.config.dim, self.config.hidden_dim, self.plan.torch_dtype, self.device)
        if self.config.is_moe and not capturable:
            return None  # the per-expert loop reads counts back to the host: nothing to capture
        return DecodeGraphs(self.model, self.cache, run_layers=self._run_layers)

    def channels(self) -> list[Channel | LocalPipe]:
        chans = (self.pipe_in, self.pipe_out, self.picks_in, self.picks_out, *self.expert_channels.values())
        return [ch for ch in chans if ch is not None]

    @property
    def overlaps_host(self) -> bool:
        """Whether this stage's worker may queue step N+1 on the device before it waits for step N (`launch`
        without waiting): a GPU stage of a placement that decodes ahead, so step N+1's plan is often already there
        when N is launched. In a pipeline that is what lets the last stage queue the send of its picks for N+1
        right behind step N's kernels, instead of after its host has waited for N and taken the next plan.
        MISTRAL_CLUSTER_OVERLAP_HOST=0 turns it off (an A/B switch); =force also on a CPU (tests: the loop's order
        of steps, where nothing runs asynchronously)."""
        mode = os.environ.get("MISTRAL_CLUSTER_OVERLAP_HOST", "1")
        if mode == "0":
            return False
        on_device = self.device.type == "cuda" or mode == "force"
        return on_device and self.plan.scheduling.decode_ahead

    def run(self, step: int, plan: StepPlan, micro_batch_size: int) -> tuple[StageResult, torch.Tensor | None]:
        """Every micro-batch of one step through this stage. The last stage also returns its picks as one tensor
        (greedy ids, their log-probabilities, the sampled rows' logits, the scored rows' scores:
        `cluster.step_wire.encode_result`)."""
        return self.finish(self.launch(step, plan, micro_batch_size, wait=True))

    @torch.inference_mode()
    def launch(self, step: int, plan: StepPlan, micro_batch_size: int, wait: bool = True) -> LaunchedStep:
        """The step's work queued on the device; with `wait`, waited for after each micro-batch (its span then
        ends when its kernels do). Without (`overlaps_host`), nothing here waits for the device: the caller
        finishes the previous step while this one is queued behind it."""
        entered = time.time()
        self._expert_seconds = 0.0
        begun = self._device_event()
        self._exchange_picks(plan)
        pending, spans, picks = [], [], []
        microbatches = split_microbatches(plan if self.first else plan.without_tokens(), micro_batch_size)
        experts = self._experts if self.config.is_moe else None
        for m, mb in enumerate(microbatches):
            wait_s = 0.0
            if self.first:
                h = self.model.embed(self._token_ids(mb))
            else:
                t0 = time.perf_counter()
                h = self.pipe_in.recv((mb.n_tokens, self.config.dim), self.plan.torch_dtype, "activations")
                wait_s = time.perf_counter() - t0
            start = time.time()
            real = h.shape[0]
            rows = self._padded_rows(mb)
            if rows > real:
                h = torch.cat([h, h.new_zeros((rows - real, h.shape[1]))])
            self._count_rows(real)
            layout = StepLayout.build(
                padded_decode(mb, rows, self.cache.scratch_slot) if rows > real else mb,
                self.capacity,
                self.config.sliding_window,
                self.config.head_dim,
                self.config.rope_theta,
                self.device,
            )
            kept = None
            if self.graphs is not None and layout.decode_slots is not None:
                h = self.graphs.run(h, layout, experts)[:real]
            else:
                kept = self._kept_rows(mb, layout)
                rows = None if kept is None else to_device(kept, torch.long, self.device)
                h = self._run_layers(h, layout, self.cache, experts, rows)
            if self.last:
                picks.append(self._pick(h, mb, kept))
            else:
                pending.append((self.pipe_out.isend(h, "activations"), h))
            if wait and self.device.type == "cuda":
                with waiting_on_peer():  # this thread's stream: NCCL work may wait on peers
                    torch.cuda.current_stream().synchronize()
            spans.append(MicrobatchSpan(m, start, time.time(), wait_s))
        joined = self._join_picks(picks) if self.last else None
        if joined is not None and self.device.type == "cuda":
            # Copied to the host behind the step's own kernels: whoever waits for `done` then has them, and no
            # copy is queued later behind a step launched after this one (that held each step's picks back a
            # whole step when steps were launched ahead).
            host = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            joined = host.copy_(joined, non_blocking=True)
        done = self._device_event()
        unwaited = not wait and self.device.type == "cuda"
        return LaunchedStep(step, entered, spans, pending, self._expert_seconds, joined, done, begun, unwaited)

    def _device_event(self) -> torch.cuda.Event | None:
        """A timing event recorded on this thread's stream now (a GPU stage): what `finish` reads the step's device
        time and the idle gap before it from."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def finish(self, launched: LaunchedStep) -> tuple[StageResult, torch.Tensor | None]:
        """Wait for a launched step's kernels and sends; its result, and its picks (on the host once `done`)."""
        spans = launched.spans
        if launched.done is not None:  # the step's kernels (launched without waiting), or a few us past its own wait
            with waiting_on_peer():
                launched.done.synchronize()
        if launched.unwaited:
            last = spans[-1]
            spans = [*spans[:-1], MicrobatchSpan(last.microbatch, last.start, time.time(), last.recv_wait)]
        t0 = time.perf_counter()
        with waiting_on_peer():
            for work, _ in launched.sends:
                work.wait()
        send_wait = time.perf_counter() - t0
        device_s = gap_s = None
        if launched.done is not None:
            device_s = launched.begun.elapsed_time(launched.done) / 1000
            if self._previous_done is not None:
                gap_s = max(0.0, self._previous_done.elapsed_time(launched.begun) / 1000)
            self._previous_done = launched.done
        result = StageResult(
            stage=self.index,
            step=launched.step,
            spans=tuple(spans),
            send_wait=send_wait,
            transport=tally(self.channels()),
            expert_seconds=launched.expert_seconds,
            entered=launched.entered,
            left=time.time(),
            device_seconds=device_s,
            device_gap_seconds=gap_s,
        )
        return result, launched.picks

    def _padded_rows(self, mb: StepPlan) -> int:
        """The rows a micro-batch runs as: a decode micro-batch replayed as a graph at its captured size
        (`padded_batch`), any other as its own tokens."""
        if self.pads_decode and self.graphs is not None and mb.is_decode:
            return padded_batch(len(mb.slots))
        return mb.n_tokens

    def _count_rows(self, real: int) -> None:
        """The next micro-batch's first `real` rows count towards `load`, the rest (padding) not."""
        if self._counted is None or real == self._counted_rows:
            return
        cut = min(real * self._experts_per_row, self._counted.shape[0])
        self._counted[:cut].fill_(1)
        self._counted[cut:].zero_()
        self._counted_rows = real

    def _exchange_picks(self, plan: StepPlan) -> None:
        """A pipeline decoding ahead, at the start of a step that feeds tokens back: the last stage sends its table of
        last picks (every step before this one has updated it: the stage runs them in order), the first stage takes
        it in place of its own. Both read the same plan, so every send meets its receive; on a GPU the first
        stage's stream, not its host, waits for the last stage's previous step. The send is complete on the last
        stage's stream before the step's activations are received there: two communicators' messages never in
        flight at once on that GPU (NCCL does not promise progress then: `busy_workers`)."""
        if self.picks_in is None and self.picks_out is None:
            return
        if plan.token_ids is None or not (np.asarray(plan.token_ids) == FED_BACK).any():
            return
        if self.picks_out is not None:
            self.picks_out.send(self.last_picks, "picks")  # (ordered on the stream before this step's picks)
        else:
            self.picks_in.recv_into(self.last_picks, "picks")

    def _token_ids(self, mb: StepPlan) -> torch.Tensor:
        """The micro-batch's token ids on the device, each FED_BACK replaced by its slot's last pick (one stage)."""
        ids = to_device(mb.token_ids, None, self.device)
        fed = np.flatnonzero(mb.token_ids == FED_BACK)
        if len(fed):
            if self.last_picks is None:
                raise ValueError(
                    f"stage {self.index} got a fed-back token but does not decode ahead (`decode_ahead` true, or auto "
                    "on one stage holding a GPU, and the same MISTRAL_CLUSTER_DECODE_AHEAD in every process)"
                )
            slots = np.repeat(np.asarray(mb.slots, np.int64), mb.lengths)[fed]
            where = to_device(fed, torch.long, self.device)
            ids = ids.clone()  # on a CPU `ids` shares the plan's array: leave the plan as it came
            ids[where] = self.last_picks[to_device(slots, torch.long, self.device)]
            self.fed_back += len(fed)
        return ids

    def _remember_picks(self, mb: StepPlan, greedy_ids: torch.Tensor) -> None:
        """Each greedy row's pick into its slot of `last_picks`: the next step may feed it back (decode ahead)."""
        slots = [s for s, w in zip(mb.slots, mb.wants(), strict=True) if w]
        slots = [s for s, g in zip(slots, mb.greedy_logit_rows(), strict=True) if g]
        if slots:
            self.last_picks[to_device(slots, torch.long, self.device)] = greedy_ids

    def _kept_rows(self, mb: StepPlan, layout: StepLayout) -> list[int] | None:
        """The rows of a last stage's output that are read (logits, scores), where that is fewer than all and the
        last layer can leave the others out: a prompt's chunk, not a decode step (every row wants its logits), and
        no experts elsewhere (an expert server expects every token of the step)."""
        if not self.last or layout.decode_slots is not None or self.has_remote_experts:
            return None
        return read_rows(mb)

    def _run_layers(
        self, h: torch.Tensor, layout: StepLayout, cache: RollingKVCache, experts, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The micro-batch through this stage's layers: as two overlapped halves (`overlap_min_seqs`, a decode step
        with experts on other workers), compiled (decode steps of a compiled size), or the shard's own loop. With
        `rows` (`_kept_rows`), only those rows come out."""
        split = self.plan.overlap_split(h.shape[0], layout.decode_slots is not None)
        if split is not None and experts is not None and self.has_remote_experts:
            return self.model.run_layers_overlapped(h, layout, cache, self, split[0])
        if self.compiled is not None:  # decode steps compiled, the rest eager
            return self.compiled.run_layers(h, layout, cache, experts, rows)
        return self.model.run_layers(h, layout, cache, experts, rows)

    @property
    def has_remote_experts(self) -> bool:
        """Whether some of this stage's layers have experts on other workers (what two-batch overlap hides)."""
        return any(self.remote_ranks.values())

    def begin(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple:
        """`shards.model.ExpertDispatch`: the tokens sent to the workers holding the layer's other experts."""
        t0 = time.perf_counter()
        remote = [self.expert_channels[r] for r in self.remote_ranks[layer]]
        if remote:
            packed = pack_for_experts(x, ids, weights)
            for ch in remote:
                ch.send(packed, "expert_in")
        self._expert_seconds += time.perf_counter() - t0
        return layer, x, ids, weights, remote

    def end(self, begun: tuple) -> torch.Tensor:
        """`shards.model.ExpertDispatch`: the local groups' sum, then every far answer added in worker order."""
        t0 = time.perf_counter()
        layer, x, ids, weights, remote = begun
        out = local_experts_sum(self.local_groups[layer], layer, x, ids, weights)
        self._count_load(layer, ids)
        for ch in remote:
            y = ch.recv(tuple(x.shape), x.dtype, "expert_out")
            out = y if out is None else out + y
        self._expert_seconds += time.perf_counter() - t0
        return out

    def _experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The MoE layer's weighted expert sum: local groups in place, one message to and from each remote worker."""
        if self.has_groups:
            return self.end(self.begin(layer, x, ids, weights))
        t0 = time.perf_counter()  # the stage holds every expert of its layers
        self._count_load(layer, ids)
        out = self.model.layers[str(layer)].block_sparse_moe.experts(x, ids, weights)
        self._expert_seconds += time.perf_counter() - t0
        return out

    def _count_load(self, layer: int, ids: torch.Tensor) -> None:
        """Tokens routed to each expert of `layer`, counted on the device (read with the stage's profile)."""
        flat = ids.flatten()
        counted = self._counted
        weights = counted[: flat.shape[0]] if counted is not None and flat.shape[0] <= counted.shape[0] else None
        self.load[layer].scatter_add_(0, flat, torch.ones_like(flat) if weights is None else weights)

    def _pick(self, h: torch.Tensor, mb: StepPlan, kept: list[int] | None = None) -> tuple[torch.Tensor, ...]:
        """The micro-batch's picks and scores from its last hidden states: every row of it, or only the `kept` ones
        (in that order)."""
        rows = to_device(kept_positions(mb.logit_rows(), kept), torch.long, self.device)
        picks = pick_tokens(self.model.logits(h[rows], float32=False), mb.greedy_logit_rows())
        if self.last_picks is not None:
            self._remember_picks(mb, picks[0])
        scored = mb.score_rows()
        if not scored:
            none = torch.empty(0, device=self.device)
            return (*picks, none, none.view(0, mb.score_k).long(), none.view(0, mb.score_k))
        targets = to_device(mb.score_targets, None, self.device)
        scored_h = h[to_device(kept_positions(scored, kept), torch.long, self.device)]
        return (*picks, *self.model.scores(scored_h, targets, mb.score_k))

    @staticmethod
    def _join_picks(picks: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The micro-batches' picks as one result message (`cluster.step_wire`), still on the device."""
        return encode_result(*(torch.cat(parts) for parts in zip(*picks, strict=True)))


@dataclass
class LaunchedStep:
    """A step queued on the device and not yet waited for (`StageRunner.launch`, then `finish`)."""

    step: int
    entered: float
    spans: list[MicrobatchSpan]
    sends: list  # (work, tensor) of the activations sent to the next stage, kept alive until they complete
    expert_seconds: float
    picks: torch.Tensor | None
    done: torch.cuda.Event | None  # timing events on a GPU: after the step's last kernel and before its first
    begun: torch.cuda.Event | None
    unwaited: bool = False  # launched without waiting for the device: `finish` waits for `done`


def pick_tokens(logits: torch.Tensor, greedy: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last stage's picks for one micro-batch, on the device: the greedy rows' argmax and its log-probability,
    and the logits (weights' dtype) of the rows the router samples. `greedy` has one flag per row of `logits`."""
    if all(greedy):  # the common case, and no boolean mask: selecting by one waits for the device to count it
        chosen, sampled = logits, logits[:0]
    else:
        rows = np.asarray(greedy, dtype=bool)
        chosen = logits[to_device(np.flatnonzero(rows), torch.long, logits.device)]
        sampled = logits[to_device(np.flatnonzero(~rows), torch.long, logits.device)]
    ids = chosen.argmax(dim=-1)
    logprobs = torch.log_softmax(chosen.float(), dim=-1).gather(1, ids[:, None])[:, 0]
    return ids, logprobs, sampled

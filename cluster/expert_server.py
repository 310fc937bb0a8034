"""A worker's expert groups serving one stage that lives on another worker. No Ray here: the worker's serving
loop calls `serve` once per step plan.

The plan says everything: which micro-batches, how many tokens each, and which of the stage's layers this
worker holds experts of. So for every micro-batch and every such layer, in order, one message comes in (the
stage's packed activations, ids and weights, every token) and one goes back (this worker's groups' weighted sum).
No header, no host sync: the same exchanges the stage makes, in the same order, on a channel of their own.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque

import torch

from cluster.stage_runner import local_experts_sum, unpack_for_experts
from cluster.transport import Channel
from router.pipeline import split_microbatches
from router.step import ExpertMessage, StepPlan
from shards.model import ExpertShard
from shards.moe import experts_capturable

TRACE_LIMIT = 10_000  # expert messages remembered for `--profile`: bounded (100 000 held ~35 MiB per worker)


class ExpertServer:
    def __init__(
        self,
        stage: int,
        stage_layers: tuple[int, ...],
        plan,
        local_groups: dict[int, ExpertShard],
        config,
        device: torch.device,
    ) -> None:
        self.stage = stage
        self.plan = plan
        self.config, self.dtype = config, plan.torch_dtype
        groups = [g for g in plan.expert_groups if g.index in local_groups]
        # The stage's layers this worker holds experts of, each with its groups (group order).
        self.layers = [
            (layer, [local_groups[g.index] for g in groups if layer in g.layers])
            for layer in stage_layers
            if any(layer in g.layers for g in groups)
        ]
        self.channel: Channel | None = None
        self.graphs: ServerGraphs | None = None  # set when the channel is (see `attach`)
        self.received: deque[ExpertMessage] = deque(maxlen=TRACE_LIMIT)
        # Tokens each held expert computed for, counted on the device (no host sync per message).
        self.computed = torch.zeros(config.n_layers, max(config.num_experts, 1), dtype=torch.long, device=device)
        self._held = {
            id(g.groups[str(layer)]): torch.tensor(g.groups[str(layer)].expert_ids, dtype=torch.long, device=device)
            for layer, gs in self.layers
            for g in gs
        }

    @property
    def needed(self) -> bool:
        return bool(self.layers)

    def attach(self, channel: Channel | None) -> None:
        """Serve on `channel` (None: the process group is being released). Decode micro-batches replay as CUDA
        graphs where the channel is NCCL (the far side of the stage's captured dispatch): eagerly, each layer's
        ~15 launches sat on the stage's critical path (two expert groups ran 0.64x one GPU at batch 1, 2026-11-30).
        MISTRAL_CLUSTER_SERVER_GRAPHS=0 turns them off; =eager replays without CUDA (what CPU tests use)."""
        self.channel = channel
        mode = os.environ.get("MISTRAL_CLUSTER_SERVER_GRAPHS", "1")
        self.graphs = None
        if channel is None or mode == "0":
            return
        if mode == "eager":
            self.graphs = ServerGraphs(self._serve_decode, replay="eager")
        elif (
            channel.device.type == "cuda"
            and not channel.via_host
            # as the stage side decides: a capture that failed would hold NCCL operations
            and experts_capturable(self.config.dim, self.config.hidden_dim, self.dtype, channel.device)
        ):
            self.graphs = ServerGraphs(self._serve_decode)

    @torch.inference_mode()
    def serve(self, plan: StepPlan, micro_batch_size: int) -> None:
        for mb in split_microbatches(plan.without_tokens(), micro_batch_size):
            if self.graphs is not None and mb.is_decode:
                if self.graphs.run(mb.n_tokens):  # a CUDA graph ran: what it did, for the trace (no host timing)
                    self.received.extend(ExpertMessage(self.stage, layer, mb.n_tokens, 0.0) for layer, _ in self.layers)
            else:
                self._serve_microbatch(mb.n_tokens, mb.is_decode)

    def _serve_decode(self, n: int) -> None:
        self._serve_microbatch(n, decode=True)

    def _serve_microbatch(self, n: int, decode: bool = False) -> None:
        """Every exchange of one micro-batch of `n` tokens: per layer, the stage's packed tokens in, the sum out. A
        decode micro-batch the stage runs as two overlapped halves (`overlap_min_seqs`) comes as two messages a layer,
        first half first; the second is received before the first half's answer goes back, since the stage sends
        both halves before it receives (a blocking send each way would otherwise wait on the other)."""
        parts = self.plan.overlap_split(n, decode) or (n,)
        dim, k = self.config.dim, self.config.num_experts_per_tok
        for layer, groups in self.layers:
            computed = None
            for part in parts:
                packed = self.channel.recv((part, dim + 2 * k), self.dtype, "expert_in")
                if computed is not None:
                    self._answer(layer, groups, *computed)
                t0 = time.perf_counter()
                x, ids, weights = unpack_for_experts(packed, dim, k)
                computed = (ids, local_experts_sum(groups, layer, x, ids, weights), t0)
            self._answer(layer, groups, *computed)

    def _answer(self, layer: int, groups: list[ExpertShard], ids: torch.Tensor, out: torch.Tensor, t0: float) -> None:
        """The groups' sum sent back; then (off the stage's path) the tokens each expert computed, and the trace."""
        self.channel.send(out, "expert_out")
        for g in groups:
            group = g.groups[str(layer)]
            held = self._held[id(group)]
            self.computed[layer].index_add_(0, held, group.tokens_per_expert(ids))
        if self.graphs is None or not self.graphs.capturing:
            self.received.append(ExpertMessage(self.stage, layer, ids.shape[0], time.perf_counter() - t0))

    def take_computed(self) -> dict[int, dict[int, int]]:
        """Tokens each held expert computed for, per layer, since the last call (read on the host: a sync)."""
        counts = self.computed.to("cpu", copy=True)  # a copy on the CPU too: zeroed next
        self.computed.zero_()
        return {
            layer: {e: int(n) for e, n in enumerate(row.tolist()) if n} for layer, row in enumerate(counts) if row.any()
        }


class ServerGraphs:
    """A serving loop's decode micro-batches as CUDA graphs, one per token count: all its layers' receive,
    experts and send in one launch. A decode micro-batch of n tokens is the same work every step, its inputs all
    arriving in the messages, so there is nothing to copy in or out: a replay is the whole step. The first of each
    size runs eagerly (its messages are real), then is captured (capturing moves no message, on either side)."""

    def __init__(self, serve_microbatch, replay: str = "cuda", max_graphs: int = 16) -> None:
        self.serve_microbatch, self.replay, self.max_graphs = serve_microbatch, replay, max_graphs
        self._graphs: OrderedDict[int, torch.cuda.CUDAGraph | None] = OrderedDict()
        self._failed: set[int] = set()
        self._pool = torch.cuda.graph_pool_handle() if replay == "cuda" else None
        self.capturing = False
        self.replays = 0

    def run(self, n: int) -> bool:
        """Serve one decode micro-batch of `n` tokens; True when a captured CUDA graph did it (the host code that
        records each message did not run)."""
        if n not in self._graphs:
            self.serve_microbatch(n)
            if n not in self._failed:
                self._capture(n)
            return False
        self._graphs.move_to_end(n)
        self.replays += 1
        graph = self._graphs[n]
        if graph is None:  # replay="eager": the same work, on the host's say-so
            self.serve_microbatch(n)
            return False
        graph.replay()
        return True

    def _capture(self, n: int) -> None:
        if self.replay == "eager":
            self._graphs[n] = None
        else:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.current_stream().synchronize()
            self.capturing = True
            try:  # on this loop's stream, thread-local, no device-wide sync (see shards/decode_graphs.py)
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self.serve_microbatch(n)
                finally:
                    graph.capture_end()
            except Exception:  # noqa: BLE001 - this size stays eager
                self._failed.add(n)
                return
            finally:
                self.capturing = False
            self._graphs[n] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

"""A pipeline stage: some layers' attention, norms and gates (plus embedding or head at the ends), and their cache.

Each step the router makes one call, `run_step`, on every stage at once. Stage k takes micro-batch m from stage
k-1 (or embeds it), runs its layers, and hands it on with a non-blocking send, so it is already on micro-batch
m+1 while stage k+1 works on m. For a MoE layer whose experts live in expert-group actors, the gate's choices
decide which tokens go to which group: each group receives only the tokens routed to it, and the weighted
results come back and are summed in token order.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from cluster.expert_dispatch import combine, expert_owners, tokens_per_group
from cluster.shard_actor import ShardActor
from router.step import MicrobatchSpan, PickedLogits, StageResult, StepPlan
from shards.checkpoint import CheckpointReader
from shards.decode_graphs import DecodeGraphs
from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity
from shards.model import TransformerShard
from shards.moe import grouped_mm_supported


class StageActor(ShardActor):
    def __init__(self, checkpoint: str, plan, index: int, attention_backend: str = "auto") -> None:
        super().__init__(f"stage{index}", rank=index)
        reader = CheckpointReader(checkpoint)
        self.config = config = reader.config
        self.plan, self.index = plan, index
        self.n_stages = len(plan.stages)
        self.selection = plan.stage_selection(index, config)
        self.model = TransformerShard.from_checkpoint(
            reader, self.selection, plan.torch_dtype, self.device, attention_backend
        )
        self.max_seq_len = config.max_seq_len
        self.capacity = cache_capacity(config.sliding_window, self.max_seq_len)
        self.cache = RollingKVCache(
            list(self.selection.layers),
            plan.max_seqs,
            self.capacity,
            config.n_kv_heads,
            config.head_dim,
            plan.torch_dtype,
            self.device,
        )
        self.n_groups = len(plan.expert_groups)
        self.owner = None
        if self.n_groups:
            self.owner = expert_owners(
                [(g.experts, g.layers) for g in plan.expert_groups], config.n_layers, config.num_experts
            ).to(self.device)  # on the device once: no host-to-device copy per layer
        self._tokens_to_group: dict[str, int] = {}  # "layer:group" -> tokens sent, this step
        self._expert_seconds = 0.0  # in the expert dispatch, this step
        self._choices: list[tuple[int, torch.Tensor]] = []  # (layer, the gate's expert ids) of the running step
        self.graphs = self._decode_graphs()
        # Expert choices counted inside captured decode steps (no host code runs on a replay).
        self._graph_load = torch.zeros(
            config.n_layers, max(config.num_experts, 1), dtype=torch.long, device=self.device
        )

    def _decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps, where the layers run here alone: a stage that sends tokens to expert groups
        in the middle of its layers has host work (the transport) in every layer. MISTRAL_CLUSTER_CUDA_GRAPHS=0 turns
        them off; =eager replays on the static buffers without CUDA (what CPU tests use)."""
        mode = os.environ.get("MISTRAL_CLUSTER_CUDA_GRAPHS", "1")
        if self.n_groups or mode == "0":
            return None
        if mode == "eager":
            return DecodeGraphs(self.model, self.cache, replay="eager")
        if self.device.type != "cuda":
            return None
        probe = torch.empty(0, self.config.dim, dtype=self.plan.torch_dtype, device=self.device)
        if self.config.is_moe and not grouped_mm_supported(probe, self.config.hidden_dim):
            return None  # the per-expert loop reads counts back to the host: nothing to capture
        return DecodeGraphs(self.model, self.cache)

    def peers(self) -> list[int]:
        neighbours = [r for r in (self.index - 1, self.index + 1) if 0 <= r < self.n_stages]
        return neighbours + [self.n_stages + g for g in range(self.n_groups)]

    def graph_replays(self) -> int:
        return self.graphs.replays if self.graphs is not None else 0

    def cache_bytes(self) -> int:
        return self.cache.nbytes

    @torch.inference_mode()
    def run_step(self, step: int, microbatches: list[StepPlan]) -> StageResult:
        """Run every micro-batch of one step through this stage; the last stage returns their picked tokens and
        logits."""
        entered = time.time()
        first, last = self.index == 0, self.index == self.n_stages - 1
        transport = self.transport
        pending_sends = []
        picked: list[PickedLogits] = []
        spans: list[MicrobatchSpan] = []
        self._tokens_to_group: dict[str, int] = {}
        self._expert_seconds = 0.0
        self._choices = []  # (layer, the gate's expert ids) of this step
        for m, mb in enumerate(microbatches):
            wait = 0.0
            if first:
                h = self.model.embed(torch.as_tensor(mb.token_ids).to(self.device))  # numpy from the router
            else:
                t0 = time.perf_counter()
                h = transport.recv((mb.n_tokens, self.config.dim), self.plan.torch_dtype, src=self.index - 1)
                wait = time.perf_counter() - t0
            start = time.time()
            layout = StepLayout.build(
                mb, self.capacity, self.config.sliding_window, self.config.head_dim, self.config.rope_theta, self.device
            )
            self._mb = m
            experts = self._dispatch if self.n_groups else self._local_experts if self.config.is_moe else None
            if self.graphs is not None and layout.decode_slots is not None:
                h = self.graphs.run(h, layout, experts)
            else:
                h = self.model.run_layers(h, layout, self.cache, experts)
            if last:
                rows = torch.tensor(mb.logit_rows(), dtype=torch.long, device=self.device)
                picked.append(pick_tokens(self.model.logits(h[rows], float32=False), mb.greedy_logit_rows()))
            else:
                pending_sends.append(transport.isend(h, dst=self.index + 1))
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # not the whole device: NCCL work may wait on peers
            spans.append(MicrobatchSpan(m, start, time.time(), wait))
        t0 = time.perf_counter()
        for work in pending_sends:
            work.wait()
        send_wait = time.perf_counter() - t0
        return StageResult(
            stage=self.index,
            step=step,
            picked=tuple(picked) if last else None,
            spans=tuple(spans),
            send_wait=send_wait,
            transport=transport.stats.take(),
            tokens_to_group=self._tokens_to_group,
            expert_choices=self._count_choices(),
            expert_seconds=self._expert_seconds,
            entered=entered,
            left=time.time(),  # the call's span in this process, on the host's clock
        )

    def _dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Send each expert group only the tokens routed to it; sum what comes back in token order."""
        t0 = time.perf_counter()
        transport = self.transport
        self._choices.append((layer, ids))
        sent = []
        for g, idx in enumerate(tokens_per_group(ids, self.owner[layer], self.n_groups)):
            n = idx.numel()
            key = f"{layer}:{g}"
            self._tokens_to_group[key] = self._tokens_to_group.get(key, 0) + n
            if n == 0:
                continue
            dst = self.n_stages + g
            transport.send_header([layer, n, 0, self._mb], dst)
            transport.send(ids[idx], dst, kind="expert_in")
            transport.send(weights[idx], dst, kind="expert_in")
            transport.send(x[idx], dst, kind="expert_in")
            sent.append((g, idx))
        partials = [
            (idx, transport.recv((idx.numel(), self.config.dim), x.dtype, self.n_stages + g, kind="expert_out"))
            for g, idx in sent
        ]
        self._expert_seconds += time.perf_counter() - t0
        return combine(partials, x)

    def _local_experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This stage holds the layer's experts: run them here, noting the gate's choices for the load statistic."""
        if self.graphs is not None and self.graphs.capturing:  # recorded into the graph: counted on every replay
            flat = ids.flatten()
            self._graph_load[layer].scatter_add_(0, flat, torch.ones_like(flat))
        else:
            self._choices.append((layer, ids))
        return self.model.layers[str(layer)].block_sparse_moe.experts(x, ids, weights)

    def _count_choices(self) -> dict[int, list[int]]:
        """Tokens per expert per layer this step, counted in a few kernels at the end of the step, not per layer
        (a statistic must not add launches or host syncs to the layers)."""
        n_experts = self.config.num_experts
        layers = {layer for layer, _ in self._choices}
        counts = torch.zeros(self.config.n_layers * n_experts, dtype=torch.long, device=self.device)
        if self._choices:
            sizes = torch.tensor([ids.numel() for _, ids in self._choices])
            offsets = torch.repeat_interleave(torch.tensor([la for la, _ in self._choices]) * n_experts, sizes)
            flat = torch.cat([ids.flatten() for _, ids in self._choices]) + offsets.to(self.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
        counts = counts.view(self.config.n_layers, n_experts)
        if self.graphs is not None and self.graphs.replays:
            counts += self._graph_load
            self._graph_load.zero_()
            layers |= {la for la in self.selection.layers if self.config.is_moe}
        self._choices = []
        counts = counts.cpu()
        return {layer: counts[layer].tolist() for layer in sorted(layers) if counts[layer].any()}

    def stop_experts(self) -> None:
        """Tell every expert group this stage sends nothing more, so their serving threads end (dead ones skipped)."""
        if self.transport is not None:
            for g in range(self.n_groups):
                with contextlib.suppress(Exception):  # that group is gone; the supervisor restarts it
                    self.transport.send_header([-1, 0, 0, 0], self.n_stages + g)


def pick_tokens(logits: torch.Tensor, greedy: tuple[bool, ...]) -> PickedLogits:
    """The last stage's answer for one micro-batch: logits (weights' dtype) of the rows the router samples, token and
    log-probability of the greedy rows. `greedy` has one flag per row of `logits`."""
    if not any(greedy):
        return PickedLogits(logits.cpu(), greedy, (), ())
    mask = torch.tensor(greedy, device=logits.device)
    chosen = logits[mask]
    ids = chosen.argmax(dim=-1)
    logprobs = torch.log_softmax(chosen.float(), dim=-1).gather(1, ids[:, None])[:, 0]
    # None when every row is greedy: even an empty torch tensor costs a Ray return ~0.5 ms to serialise.
    rest = logits[~mask].cpu() if not all(greedy) else None
    return PickedLogits(rest, greedy, tuple(ids.tolist()), tuple(logprobs.tolist()))

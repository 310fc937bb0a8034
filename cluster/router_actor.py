"""The router actor: owns the schedule and the step loop of a sharded model.

Each step it decides the batch (`router.scheduler`), cuts it into micro-batches (`router.pipeline`), and makes
one call per stage; the stages move activations among themselves and to the expert groups on the transport.
The last stage's logits come back, the router samples, and the loop goes on.
"""

from __future__ import annotations

import time

import ray
import torch

from router.generation import Completion, generate
from router.pipeline import join_logits, split_microbatches
from router.sampling import SamplingParams
from shards.config import ModelConfig
from shards.kv_cache import StepBatch, cache_capacity


class RouterActor:
    def __init__(self, stages: list, experts: list, plan, config: ModelConfig, step_timeout_s: float = 120.0) -> None:
        self.stages, self.experts, self.plan, self.config = stages, experts, plan, config
        self.max_seqs = plan.max_seqs
        self.max_seq_len = config.max_seq_len
        self.cache_capacity = cache_capacity(config.sliding_window, config.max_seq_len)
        self.step_timeout_s = step_timeout_s
        self.steps = 0
        self.traces: list[dict] = []
        self.expert_load = torch.zeros(config.n_layers, max(config.num_experts, 1), dtype=torch.long)

    def step(self, batch: StepBatch) -> torch.Tensor:
        t0 = time.perf_counter()
        microbatches = split_microbatches(batch, self.plan.micro_batch_size)
        later = [StepBatch(mb.slots, mb.starts, mb.lengths, None, mb.want_logits) for mb in microbatches]
        refs = [
            stage.run_step.remote(self.steps, microbatches if i == 0 else later) for i, stage in enumerate(self.stages)
        ]
        results = ray.get(refs, timeout=self.step_timeout_s)
        logits = join_logits(results[-1]["logits"], self.config.vocab_size)
        for r in results:
            for layer, counts in r.get("expert_choices", {}).items():
                self.expert_load[int(layer)] += torch.tensor(counts)
        self.traces.append({
            "step": self.steps, "tokens": batch.n_tokens, "sequences": len(batch.slots),
            "microbatches": len(microbatches), "seconds": time.perf_counter() - t0,
            "stages": [{k: v for k, v in r.items() if k != "logits"} for r in results],
        })
        self.steps += 1
        return logits

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[Completion]:
        t0 = time.perf_counter()
        out = generate(self, prompts, params, chunk_size=self.plan.chunk_size, token_budget=self.plan.token_budget)
        self.last_generate_seconds = time.perf_counter() - t0
        return out

    def take_traces(self) -> list[dict]:
        traces, self.traces = self.traces, []
        return traces

    def expert_traces(self) -> list[dict]:
        return ray.get([e.trace.remote() for e in self.experts], timeout=self.step_timeout_s)

    def get_expert_load(self) -> list[list[int]]:
        return self.expert_load.tolist()

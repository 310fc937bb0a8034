"""An expert group: some experts of some layers, serving every pipeline stage.

After joining the transport group it runs one serving thread per stage: wait for a header (layer, tokens), take
the tokens' activations and top-k choices, run only the experts those tokens chose, send the weighted sum back.
No Ray call is on this path.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from cluster.shard_actor import ShardActor
from cluster.transport import STOP
from router.step import ExpertMessage, ExpertTrace
from shards.checkpoint import CheckpointReader
from shards.model import ExpertShard


def _no_stream():
    return contextlib.nullcontext()


class ExpertGroupActor(ShardActor):
    def __init__(self, checkpoint: str, plan, index: int) -> None:
        super().__init__(f"experts{index}", rank=len(plan.stages) + index)
        reader = CheckpointReader(checkpoint)
        self.config = reader.config
        self.plan, self.index = plan, index
        self.selection = plan.expert_selection(index, self.config)
        self.model = ExpertShard.from_checkpoint(reader, self.selection, plan.torch_dtype, self.device)
        # One record per message: stage, layer, tokens, per_expert (counts, still on the device), seconds.
        self.received: list[dict] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def join(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        timeout_s: float,
        device_keys: list[str] | None = None,
    ) -> str:
        backend = super().join(master_addr, master_port, world_size, timeout_s, device_keys)
        for stage in range(len(self.plan.stages)):
            t = threading.Thread(target=self._serve, args=(stage,), name=f"serve-stage{stage}", daemon=True)
            t.start()
            self._threads.append(t)
        return backend

    def peers(self) -> list[int]:
        return list(range(len(self.plan.stages)))

    @torch.inference_mode()
    def _serve(self, src: int) -> None:
        # Each serving thread works on its own CUDA stream: a thread waiting for one stage's next message must not
        # hold up another thread's expert work on a shared stream (that deadlocks a two-stage pipeline).
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else _no_stream():
            self._serve_on_stream(src)

    def _serve_on_stream(self, src: int) -> None:
        transport, k, dim, dtype = (
            self.transport,
            self.config.num_experts_per_tok,
            self.config.dim,
            self.plan.torch_dtype,
        )
        try:
            while True:
                layer, n, _, _ = transport.recv_header(src)
                if layer == STOP:
                    return
                ids = transport.recv((n, k), torch.long, src, kind="expert_in")
                weights = transport.recv((n, k), dtype, src, kind="expert_in")
                x = transport.recv((n, dim), dtype, src, kind="expert_in")
                t0 = time.perf_counter()
                out = self.model(layer, x, ids, weights)
                # Counted on the device before the sync below, read as numbers only when `trace` is asked for.
                held = self.model.groups[str(layer)].tokens_per_expert(ids)
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()  # this thread's stream only, never the whole device
                seconds = time.perf_counter() - t0
                transport.send(out, src, kind="expert_out")
                with self._lock:
                    self.received.append(
                        {"stage": src, "layer": layer, "tokens": n, "per_expert": held, "seconds": seconds}
                    )
        except Exception as e:  # noqa: BLE001 - reported through `trace` and health, never silently lost
            self.errors.append(f"{self.name} serving stage{src}: {type(e).__name__}: {e}")

    def reset_transport(self) -> None:
        """Wait for the serving threads to end (the live stages sent STOP; a dead stage's recv fails), then leave."""
        deadline = time.monotonic() + 5
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError(f"{self.name}: serving threads still blocked; restart this shard")
        self._threads = []
        super().reset_transport()

    def trace(self) -> ExpertTrace:
        """Messages served since the last call (and any serving error)."""
        with self._lock:
            received, self.received = self.received, []
        messages = []
        for r in received:
            ids = self.model.groups[str(r["layer"])].expert_ids
            per_expert = dict(zip(ids, r["per_expert"].tolist(), strict=True))
            messages.append(ExpertMessage(r["stage"], r["layer"], r["tokens"], per_expert, r["seconds"]))
        return ExpertTrace(self.index, tuple(messages), tuple(self.errors))

    def serving(self) -> int:
        return sum(t.is_alive() for t in self._threads)

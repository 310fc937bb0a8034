"""A worker: one process per device, holding every shard the placement puts there (`cluster.workers`), and the
long-lived loops that run them. `cluster.sharded` wraps the class with `ray.remote`.

Ray starts the worker, places it and calls it for the control plane only (where it is, joining the data plane,
traces, statistics, resets). Steps never go through Ray: a control loop takes each step plan off the step link
(`cluster.step_link`) and hands it to the worker's stage loop (if it holds a stage) and to one expert-serving
loop per stage elsewhere whose layers this worker holds experts of. Each loop runs in its own thread on its own
CUDA stream and owns its channels. A loop that fails reports why on the step link, so the step fails with the
cause named, and stops; recovery resets or restarts the worker.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

import ray
import torch

import cluster
from cluster.expert_server import ExpertServer
from cluster.stage_runner import LaunchedStep, StageRunner
from cluster.step_link import LinkClosed, WorkerLink
from cluster.step_wire import WirePlan, decode_plan
from cluster.transport import (
    ChannelKey,
    LocalPipe,
    Transport,
    device_key,
    free_port,
    node_ip,
    threads_waiting,
)
from cluster.workers import WorkerMap, busy_workers, group_workers
from router.step import ExpertTrace, ShardLocation, StageResult
from shards.checkpoint import CheckpointReader, HostCopy
from shards.model import ExpertShard

TRACE_LIMIT = 10_000  # stage results kept for `--profile` and benchmarks: bounded, a server runs for months
_IMPORTED = time.time()  # this module and its imports (torch, xformers) done: see `ShardWorker.started`


def data_channels(plan, workers: WorkerMap) -> list[ChannelKey]:
    """Every channel of the data plane, in one order all workers agree on: stage to next stage, then each stage to
    each other worker holding experts of its layers, then (a pipeline decoding ahead) the last stage's picks to
    the first stage."""
    keys = []
    for s in range(len(plan.stages) - 1):
        a, b = workers.of_stage(s).index, workers.of_stage(s + 1).index
        if a != b:
            keys.append(ChannelKey("pipe", a, b, s))
    for s, stage in enumerate(plan.stages):
        a = workers.of_stage(s).index
        holders = {workers.of_group(g.index).index for g in plan.expert_groups if set(g.layers) & set(stage.layers)}
        keys += [ChannelKey("experts", a, b, s) for b in sorted(holders - {a})]
    if plan.scheduling.decode_ahead and len(plan.stages) > 1:  # (the placement put them in different workers)
        keys.append(ChannelKey("picks", workers.of_stage(len(plan.stages) - 1).index, workers.of_stage(0).index, 0))
    return keys


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses): field 0 is the
    state ("Z" for a zombie), field 19 the start time in clock ticks after boot. Raises OSError without /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _available_memory(cgroup: str = "/sys/fs/cgroup") -> int:
    """Bytes of host memory available for new allocations: /proc/meminfo's MemAvailable, or less where this
    process's cgroup (v2) has a limit, as a Kubernetes pod has (/proc/meminfo shows the whole node there, and a copy
    sized by it would get the pod OOM-killed). 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        used = int(Path(cgroup, "memory.current").read_text())
    except (OSError, ValueError):
        return available  # no cgroup v2 memory controller here
    return available if limit == "max" else max(0, min(available, int(limit) - used))


def _process_start_time() -> float:
    """This process's start (host clock), from /proc; the time of this call where /proc is missing."""
    try:
        ticks = int(proc_stat(os.getpid())[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class ShardWorker:
    def __init__(
        self, checkpoint: str, plan, index: int, attention_backend: str = "auto", standby: bool = False
    ) -> None:
        """Load this worker's shards. A `standby` loads nothing yet: it has its imports done and its CUDA context
        made, and `promote` loads the shards when the worker it stands in for dies (a restart then costs the load
        and the join, not ~10 s of a new process's imports)."""
        # When each phase of this worker's start ended (host clock): what a restart costs, and where.
        self.started = {
            "process": _process_start_time(),
            "imports": cluster.IMPORTED_AT,  # when this process began importing the package (Ray unpickling us)
            "imported": _IMPORTED,
            "init": time.time(),
        }
        self.plan, self.index, self.checkpoint, self.attention_backend = plan, index, checkpoint, attention_backend
        self.workers = WorkerMap(group_workers(plan))
        self.spec = self.workers.workers[index]
        self.name = self.spec.name
        gpu_ids = ray.get_gpu_ids()
        self.device = torch.device("cuda", 0) if gpu_ids and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # the CUDA context, made now so that its cost shows as a phase
            self.started["cuda"] = time.time()
        else:
            torch.set_num_threads(max(1, int(os.environ.get("MISTRAL_CLUSTER_THREADS", "1"))))
        dump_every = os.environ.get("MISTRAL_CLUSTER_STACK_DUMP_S")
        if dump_every:  # diagnosing a stall: every thread's Python stack to this worker's stderr, periodically
            faulthandler.dump_traceback_later(float(dump_every), repeat=True, file=sys.stderr)
        self.stages: dict[int, StageRunner] = {}
        self.expert_groups: dict[int, ExpertShard] = {}
        self.servers: list[ExpertServer] = []
        self.transport: Transport | None = None
        self.link: WorkerLink | None = None
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._activity: dict[str, tuple[int, float, int]] = {}  # loop -> (step, since, thread) while in a step
        self._stall_s = 0.0
        self.results: deque[StageResult] = deque(maxlen=TRACE_LIMIT)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._joining = threading.Lock()  # a reset never runs beside a join (a router may die during one)
        self._data_loops = 0  # loops using the process group that have not ended: the last one to end releases it
        self.standby = standby
        self._host_copy: HostCopy | None = None
        self._copying: threading.Thread | None = None
        if standby:  # answers pings at once; its copy of the weights is made meanwhile
            self._copying = threading.Thread(target=self._copy_to_host, name="host-copy", daemon=True)
            self._copying.start()
        else:
            self._load()

    def _selections(self, config) -> list:
        return [self.plan.expert_selection(g, config) for g in self.spec.expert_groups] + [
            self.plan.stage_selection(s, config) for s in self.spec.stages
        ]

    def _copy_to_host(self) -> None:
        """A standby reads its worker's tensors into host memory, so that a promotion copies them to the device
        instead of reading the checkpoint again: unless the checkpoint is random (drawn on the device, faster) or
        the node lacks room (it keeps twice their bytes available for everything else)."""
        reader = CheckpointReader(self.checkpoint)
        if reader.random is not None:
            return
        selections = self._selections(reader.config)
        need = sum(s.nbytes(reader.config, self.plan.torch_dtype) for s in selections)
        available = _available_memory()
        if 2 * need > available:
            print(
                f"{self.name} standby: no host copy of its {need / 2**30:.1f} GiB of weights "
                f"({available / 2**30:.1f} GiB available); a promotion reads the checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return
        try:
            self._host_copy = HostCopy(reader, selections, self.plan.torch_dtype)
        except Exception as e:  # noqa: BLE001 - the promotion reads the checkpoint instead, and says why if it fails
            print(f"{self.name} standby: host copy failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
        self.started["host_copy"] = time.time()

    def _load(self) -> None:
        """This worker's expert groups, stages and expert services: from the checkpoint, or from the host copy a
        standby made of them."""
        reader = self._host_copy or CheckpointReader(self.checkpoint)
        self.config = config = reader.config
        plan, dtype = self.plan, self.plan.torch_dtype
        groups = {
            g: ExpertShard.from_checkpoint(reader, plan.expert_selection(g, config), dtype, self.device)
            for g in self.spec.expert_groups
        }
        self.expert_groups = groups
        self.stages = {
            s: StageRunner(reader, plan, s, self.workers, groups, self.device, self.attention_backend)
            for s in self.spec.stages
        }
        servers = [
            ExpertServer(s, stage.layers, plan, groups, config, self.device)
            for s, stage in enumerate(plan.stages)
            if s not in self.stages
        ]
        self.servers = [s for s in servers if s.needed]
        self.started["loaded"] = time.time()

    def promote(self) -> ShardLocation:
        """A standby takes the place of the worker it stands in for: it loads that worker's shards (the
        supervisor joins it to the data plane next). Returns its location, as `location` does once loaded."""
        with self._joining:
            if self.standby:
                self.started["promoted"] = time.time()
                if self._copying is not None:
                    self._copying.join()  # a copy under way reads the checkpoint as fast as a new read would
                self._load()
                self._host_copy = None  # the device has the weights now: the host memory goes back
                self.standby = False
        return self.location()

    # --- control plane (Ray calls) ---------------------------------------------------------------------------

    def location(self) -> ShardLocation:
        """Where Ray put this worker, from Ray's own runtime context (what placement tests assert on)."""
        ctx = ray.get_runtime_context()
        return ShardLocation(
            shard=self.name,
            node_id=ctx.get_node_id(),
            node_ip=node_ip(),
            pid=os.getpid(),
            gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()),
            device=str(self.device),
            placement_group=ctx.get_placement_group_id(),
            device_key=f"{ctx.get_node_id()}/{device_key(self.device)}",
        )

    def rendezvous(self) -> tuple[str, int]:
        """Worker 0 names the address every worker joins the process group at."""
        return node_ip(), free_port()

    def join(
        self,
        master_addr: str,
        master_port: int,
        timeout_s: float,
        device_keys: list[str],
        router_address: tuple[str, int],
    ) -> str:
        """Join a fresh data plane: the process group with the other workers, the step link to the router; then
        start the loops."""
        with self._joining:
            return self._join(master_addr, master_port, timeout_s, device_keys, router_address)

    def _join(self, master_addr, master_port, timeout_s, device_keys, router_address) -> str:
        world = len(self.workers.workers)
        via_host = bool(busy_workers(self.plan, self.workers.workers))
        if via_host and os.environ.get("MISTRAL_CLUSTER_CONCURRENT_NCCL") == "1":
            via_host = False
            os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
        self.transport = Transport(
            self.index,
            world,
            master_addr,
            master_port,
            self.device,
            timeout_s,
            device_keys,
            data_channels(self.plan, self.workers),
            all_via_host=via_host,
        )
        for runner in self.stages.values():
            runner.attach(self.transport)
            if runner.index + 1 in self.stages:  # the next stage lives here too
                runner.pipe_out = self.stages[runner.index + 1].pipe_in = LocalPipe()
        for server in self.servers:
            server.attach(
                self.transport.channel("experts", self.workers.of_stage(server.stage).index, self.index, server.stage)
            )
        self._warm_up()
        self.errors = []
        self.link = WorkerLink(tuple(router_address), self.index, timeout_s)
        self._start_loops()
        self.started.setdefault("joined", time.time())  # the first data plane this process joined
        return self.transport.backend

    def start_phases(self) -> dict[str, float]:
        """When this process started, entered `__init__`, had its weights on the device, first joined the data
        plane (host clock, seconds since the epoch)."""
        return dict(self.started)

    def _warm_up(self) -> None:
        """One message each way on every channel now, so NCCL's per-pair setup (~0.5 s) is not in the first step.
        Channels in one global order, which no two workers can wait on in a cycle."""
        probe = torch.zeros(1, device=self.device)
        for key, ch in self.transport.channels.items():
            if self.index == key.a:
                ch.send(probe, "warm_up")
                ch.recv((1,), probe.dtype, "warm_up")
            else:
                ch.recv((1,), probe.dtype, "warm_up")
                ch.send(probe, "warm_up")
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            ch.stats.take()

    def reset_transport(self) -> None:
        """Leave the data plane (a peer or the router is gone): close the link, which ends the control loop; the
        loops end once their current step does, or at once where a peer that is gone was to send (NCCL's waits are
        aborted; a gloo wait ends when its peer's process group is released). A loop still waiting on a peer after
        a few seconds means this worker must be restarted: that raises."""
        with self._joining:
            if self.link is not None:
                self.link.close()
            for q in self._queues:
                q.put(None)
            deadline = time.monotonic() + 3
            aborted = ""
            if self.device.type == "cuda" and self.transport is not None:
                aborted = self.transport.abort(timeout_s=2.0)
                print(f"{self.name} reset: {aborted}", file=sys.stderr, flush=True)
            for t in self._threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            blocked = [t.name for t in self._threads if t.is_alive()]
            if blocked:
                # Where each blocked loop waits, in this worker's log: what tells a stuck kernel from a stuck abort.
                print(f"{self.name}: loops {', '.join(blocked)} still blocked; stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                raise RuntimeError(
                    f"{self.name}: loops {', '.join(blocked)} still blocked; restart this worker"
                    + (f" (abort: {aborted})" if aborted else "")
                )
            self._threads, self._queues = [], []
            self._release_transport()

    def _release_transport(self) -> None:
        """Destroy the process group and drop every reference to it: its sockets close, so a peer still waiting on
        this worker for a message (its loop blocked in a gloo receive) fails at once instead of at the timeout."""
        with self._lock:
            transport, self.transport = self.transport, None
        if transport is None:
            return
        for runner in self.stages.values():
            runner.detach()
        for server in self.servers:
            server.attach(None)
        transport.close()
        del transport
        gc.collect()

    def ping(self) -> str:
        return self.name

    def stage_results(self) -> list[StageResult]:
        """This worker's stages' results since the last call."""
        with self._lock:
            results, self.results = list(self.results), deque(maxlen=TRACE_LIMIT)
        return results

    def expert_traces(self) -> list[ExpertTrace]:
        """What this worker's expert groups served since the last call, one trace per stage served, with any error."""
        traces = []
        for server in self.servers:
            received, server.received = tuple(server.received), deque(maxlen=server.received.maxlen)
            traces.append(ExpertTrace(self.name, received, server.take_computed(), tuple(self.errors)))
        return traces

    def expert_load(self) -> list[list[int]] | None:
        """Tokens per expert per layer chosen by this worker's gates since it started (None: it holds no stage). The
        model's last layer gates only the rows whose logits or scores are read (`TransformerShard.run_layers`), so a
        prompt's other tokens are not counted there."""
        if not self.stages:
            return None
        return sum(r.load.cpu() for r in self.stages.values()).tolist()

    def graph_replays(self) -> int:
        """Decode micro-batches this worker's stages and expert services ran as captured graphs."""
        stages = sum(r.graphs.replays for r in self.stages.values() if r.graphs is not None)
        return stages + sum(s.graphs.replays for s in self.servers if s.graphs is not None)

    def expert_shapes(self) -> dict[str, list[list[int]]]:
        """Each expert group this worker holds: the shapes of its first layer's stacked w13 and w2 (a part of the
        experts' hidden rows shows here)."""
        out = {}
        for g, shard in self.expert_groups.items():
            first = next(iter(shard.groups.values()))
            out[f"experts{g}"] = [list(first.w13.shape), list(first.w2.shape)]
        return out

    def cache_bytes(self) -> int:
        return sum(r.cache.nbytes for r in self.stages.values())

    def decode_paths(self) -> dict[str, dict]:
        """Per stage: whether its decode steps replay CUDA graphs, the batch sizes it runs compiled, how long
        compiling took while loading and, where it failed, why; and how many tokens it fed back (decode ahead)."""
        out = {}
        for s, r in self.stages.items():
            c = r.compiled
            out[f"stage{s}"] = {
                "graphs": r.graphs is not None,
                "compiled_batches": list(c.compiled) if c is not None else [],
                "compile_s": round(c.warm_up_s, 1) if c is not None else None,
                "compile_error": c.error if c is not None else None,
                # how often a decode step met a shape with no graph yet (run eagerly, then captured) against replays
                "graph_captures": r.graphs.captures if r.graphs is not None else 0,
                "graph_replays": r.graphs.replays if r.graphs is not None else 0,
                "graph_batches": r.graphs.batches if r.graphs is not None else [],  # padded: `padded_batch`'s sizes
                "fed_back_tokens": r.fed_back,  # decode ahead: tokens fed in from the stage's own picks
                "launched_ahead_steps": r.launched_ahead,  # launched by one thread, waited for by another
                "overlapped_steps": r.overlapped,  # steps queued on the device behind the one before
            }
        return out

    # --- the loops ---------------------------------------------------------------------------------------------

    def _start_loops(self) -> None:
        work = [(f"stage{s}", self._stage_loop, runner) for s, runner in self.stages.items()]
        work += [(f"serve-stage{srv.stage}", self._serve_loop, srv) for srv in self.servers]
        self._queues = [queue.Queue() for _ in work]
        self._data_loops = len(work)
        self._threads = [threading.Thread(target=self._control_loop, name="control", daemon=True)]
        for (name, loop, target), q in zip(work, self._queues, strict=True):
            self._threads.append(
                threading.Thread(target=self._on_stream, args=(loop, target, q), name=name, daemon=True)
            )
        for t in self._threads:
            t.start()

    def _control_loop(self) -> None:
        try:
            while (message := self.link.recv_plan()) is not None:
                wire = decode_plan(message)
                for q in self._queues:
                    q.put(wire)
        except (LinkClosed, OSError):
            pass  # the router is gone or this worker is being reset: the other loops end with the queues
        except Exception as e:  # noqa: BLE001 - reported to the router, never silently lost
            self._failed("control", e)
        finally:
            for q in self._queues:
                q.put(None)

    def _on_stream(self, loop, target, q: queue.Queue) -> None:
        # Each loop on its own CUDA stream: a loop waiting for one peer's message must not hold up another loop's
        # work on a shared stream (that deadlocked a two-stage pipeline with expert groups).
        try:
            if self.device.type == "cuda":
                with torch.cuda.stream(torch.cuda.Stream(self.device)):
                    loop(target, q)
            else:
                loop(target, q)
        finally:
            with self._lock:
                self._data_loops -= 1
                last = self._data_loops == 0
            if last and self.device.type != "cuda":
                # Every loop that used the group has ended (failed, or told to stop): release it now, so peers
                # waiting on this worker hear of it before recovery even starts. (On a GPU the reset aborts.)
                self._release_transport()

    def inject_stall(self, seconds: float) -> None:
        """Fault injection (tests, chaos drills): the next step of this worker's stages sleeps `seconds` first, as
        a kernel or a collective that never returns would. The worker still answers pings: only the step deadline
        (`router.step_deadline`) can find it."""
        self._stall_s = seconds

    def wedged(self, after_s: float) -> list[str]:
        """This worker's loops that have been in one step for over `after_s` without waiting on a peer: stuck in
        themselves, not behind someone else. A recovery kills such a worker first (its peers' waits then end); on
        a GPU a device sync counts as waiting, so a wedged kernel shows as waiting and is found by the reset."""
        now, waiting = time.monotonic(), threads_waiting()
        return [
            f"{loop} in step {step} for {now - since:.1f} s"
            for loop, (step, since, thread) in list(self._activity.items())
            if now - since > after_s and thread not in waiting
        ]

    def _stepping(self, loop: str, step: int | None) -> None:
        if step is None:
            self._activity.pop(loop, None)
        else:
            self._activity[loop] = (step, time.monotonic(), threading.get_ident())

    def _stage_loop(self, runner: StageRunner, q: queue.Queue) -> None:
        """Each plan through the stage, its picks sent back. Where the stage overlaps the host (`overlaps_host`: a
        GPU stage of a placement decoding ahead) the steps are launched by this thread as their plans come and
        waited for by another (`_deliver_loop`), so step N+1 is queued on the device as soon as its plan is here,
        whatever step N is doing: the device goes from one step to the next without waiting for the host (the
        layout, the picks' send, the next plan's decoding). Measured on an H200 before (one thread, N+1 queued only
        when its plan was already here when N was launched): the device idled 0.66 ms a step at batch 1, 8 % of the
        time."""
        if runner.overlaps_host:
            self._launch_loop(runner, q)
            return
        loop = f"stage{runner.index}"
        while (wire := q.get()) is not None:
            self._stepping(loop, wire.step)
            self._take_stall()
            try:
                self._deliver(runner, runner.launch(wire.step, wire.plan, wire.micro_batch_size, wait=True))
            except Exception as e:  # noqa: BLE001 - the step fails with this cause; recovery resets the worker
                self._failed(f"stage{runner.index} step {wire.step}", e)
                return
            finally:
                self._stepping(loop, None)

    def _take_stall(self) -> None:
        stall, self._stall_s = self._stall_s, 0.0
        if stall:
            time.sleep(stall)

    def _launch_loop(self, runner: StageRunner, q: queue.Queue) -> None:
        """`_stage_loop` for a stage that overlaps the host: launch here, wait and send in `_deliver_loop`."""
        loop = f"stage{runner.index}"
        launched: queue.Queue = queue.Queue()
        undelivered = [0]  # steps launched and not yet delivered (under self._lock)
        waiter = threading.Thread(
            target=self._deliver_loop, args=(runner, launched, undelivered), name=f"{loop}-deliver", daemon=True
        )
        waiter.start()
        try:
            while (wire := q.get()) is not None:
                self._stepping(loop, wire.step)
                self._take_stall()
                try:
                    step = runner.launch(wire.step, wire.plan, wire.micro_batch_size, wait=False)
                except Exception as e:  # noqa: BLE001 - as in `_stage_loop`
                    self._failed(f"stage{runner.index} step {wire.step}", e)
                    return
                finally:
                    self._stepping(loop, None)
                with self._lock:
                    runner.launched_ahead += 1
                    if undelivered[0]:
                        runner.overlapped += 1  # queued on the device behind a step not yet waited for
                    undelivered[0] += 1
                launched.put(step)
        finally:
            launched.put(None)  # the steps already launched are still delivered
            waiter.join()

    def _deliver_loop(self, runner: StageRunner, launched: queue.Queue, undelivered: list[int]) -> None:
        """Each launched step waited for in launch order, its picks sent; a failure fails the step and stops here
        (the launching thread's next step then fails at the router's deadline or on the closed link)."""
        while (step := launched.get()) is not None:
            try:
                self._deliver(runner, step)
            except Exception as e:  # noqa: BLE001 - as in `_stage_loop`
                self._failed(f"stage{runner.index} step {step.step}", e)
                return
            with self._lock:
                undelivered[0] -= 1

    def _deliver(self, runner: StageRunner, launched: LaunchedStep) -> None:
        """A launched step waited for: its picks to the router, its result kept for the traces."""
        result, picks = runner.finish(launched)
        if picks is not None:
            self.link.send_result(picks.numpy())
        with self._lock:
            self.results.append(result)

    def _serve_loop(self, server: ExpertServer, q: queue.Queue) -> None:
        wire: WirePlan
        loop = f"experts for stage{server.stage}"
        while (wire := q.get()) is not None:
            self._stepping(loop, wire.step)
            try:
                server.serve(wire.plan, wire.micro_batch_size)
            except Exception as e:  # noqa: BLE001 - as in the stage loop
                self._failed(f"experts for stage{server.stage} step {wire.step}", e)
                return
            finally:
                self._stepping(loop, None)

    def _failed(self, where: str, e: Exception) -> None:
        message = f"{self.name} {where}: {type(e).__name__}: {e}"
        self.errors.append(message)
        print(message, file=sys.stderr, flush=True)  # in the worker's log too, whatever happens to the link
        try:
            self.link.send_error(message)
        except OSError:
            pass  # the router is gone: it learns nothing more from this worker, and recovery resets it

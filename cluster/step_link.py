"""The step link: one TCP connection between the router and each worker, carrying every step's plan out and the
picked tokens back, with no Ray call on the way.

Why a plain socket, not Ray or the workers' process group: a Ray call costs ~0.8 ms; a socket message ~30 us. A
worker whose process dies closes its connection, so the router hears of it at once instead of at a timeout; a
worker loop that fails sends its error as a frame, so the step fails with the cause named; and closing a socket
unblocks whoever waits on it, which is how recovery stops loops that wait on a peer that is gone.

Frames: kind and payload length (two little-endian int64), then the payload (`cluster.step_wire` layouts).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import numpy as np

PLAN, STOP, RESULT, ERROR = 1, 2, 3, 4
_FRAME = struct.Struct("<qq")


class LinkClosed(ConnectionError):
    """The other end closed the connection (its process died, or it was told to stop)."""

    def __init__(self, message: str, worker: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker  # on the router's end: the worker whose connection it was


class WorkerFailed(RuntimeError):
    """A worker's loop failed; the message is the worker's own account of why."""

    def __init__(self, message: str, worker: int) -> None:
        super().__init__(message)
        self.worker = worker


class ResultTimeout(TimeoutError):
    """No result came from a worker in time."""

    def __init__(self, message: str, worker: int) -> None:
        super().__init__(message)
        self.worker = worker


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise LinkClosed("connection closed")
        got += k
    return buf


def _recv_frame(sock: socket.socket) -> tuple[int, bytearray]:
    kind, size = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return kind, _recv_exact(sock, size) if size else bytearray()


def _frame(kind: int, payload: bytes | memoryview = b"") -> bytes:
    return _FRAME.pack(kind, len(payload)) + bytes(payload)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a plan is one small write: send it now


class RouterLink:
    """The router's end: listens, accepts one connection per worker, sends plans, receives results."""

    def __init__(self, host: str) -> None:
        self._server = socket.create_server((host, 0))
        self.address = (host, self._server.getsockname()[1])
        self.workers: dict[int, socket.socket] = {}
        self.closed = False

    def accept(self, n_workers: int, timeout_s: float) -> bool:
        """Take the connections of workers that come within `timeout_s`; True once all `n_workers` have (each says
        which it is)."""
        deadline = time.monotonic() + timeout_s
        while len(self.workers) < n_workers:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._server.settimeout(left)
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                return False
            sock.settimeout(None)
            _tune(sock)
            (index,) = struct.unpack("<q", _recv_exact(sock, 8))
            self.workers[index] = sock
        return True

    def send_plan(self, payload: np.ndarray) -> None:
        if self.closed:
            raise LinkClosed("the step link is closed (the data plane is being replaced)")
        frame = _frame(PLAN, payload.astype(np.int64, copy=False).tobytes())
        for index, sock in self.workers.items():
            try:
                sock.sendall(frame)
            except OSError as e:
                raise LinkClosed(f"worker {index}: {e}", index) from None

    def recv_result(self, worker: int, timeout_s: float) -> np.ndarray:
        """The next result frame from `worker`; an error frame or a closed connection from any worker fails at once,
        and so does silence past `timeout_s`; the exception's `worker` says which."""
        deadline = time.monotonic() + timeout_s
        socks = {sock: index for index, sock in self.workers.items()}
        if self.closed or not socks:  # select over no socket would only sleep out the deadline
            raise LinkClosed("the step link is closed (the data plane is being replaced)")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(f"no result from worker {worker} within {timeout_s:g} s", worker)
            readable, _, _ = select.select(list(socks), [], [], left)
            for sock in readable:
                index = socks[sock]
                try:
                    kind, payload = _recv_frame(sock)
                except (LinkClosed, OSError) as e:
                    raise LinkClosed(f"worker {index} closed its step link ({e})", index) from None
                if kind == ERROR:
                    raise WorkerFailed(payload.decode(errors="replace"), index)
                if kind == RESULT and index == worker:
                    return np.frombuffer(payload, dtype=np.float32)
                raise WorkerFailed(f"worker {index} sent an unexpected frame of kind {kind}", index)

    def close(self) -> None:
        self.closed = True
        for sock in [*self.workers.values(), self._server]:
            _close(sock)
        self.workers = {}


class WorkerLink:
    """A worker's end: receives plans (in its control loop), sends results and errors (from any of its loops)."""

    def __init__(self, address: tuple[str, int], index: int, timeout_s: float) -> None:
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._sock.settimeout(None)
        _tune(self._sock)
        self._sock.sendall(struct.pack("<q", index))
        self._send_lock = threading.Lock()

    def recv_plan(self) -> np.ndarray | None:
        """The next plan, or None when told to stop. Raises LinkClosed when the router is gone or `close` was called."""
        kind, payload = _recv_frame(self._sock)
        if kind == STOP:
            return None
        if kind != PLAN:
            raise LinkClosed(f"unexpected frame of kind {kind} from the router")
        return np.frombuffer(payload, dtype=np.int64)

    def send_result(self, payload: np.ndarray) -> None:
        self._send(_frame(RESULT, payload.astype(np.float32, copy=False).tobytes()))

    def send_error(self, message: str) -> None:
        self._send(_frame(ERROR, message.encode()))

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(frame)

    def close(self) -> None:
        _close(self._sock)


def _close(sock: socket.socket) -> None:
    """Shut down first: a thread blocked in `recv` on this socket returns at once (a bare close may not wake it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # never connected, or already closed by the peer
    sock.close()

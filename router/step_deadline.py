"""How long the router waits for a step's result before it declares the step failed: a deadline derived from how
long recent steps took, not a fixed timeout.

A worker that answers pings but whose loop is stuck (a collective waiting on a peer that is alive but wedged, a
kernel that never returns) is invisible to the monitor; only the step it holds up shows it. With a fixed 120 s
timeout such a hang stalled every stream for two minutes. Here the deadline is a multiple of what a step of that
many tokens has been taking (the cheapest recent step plus the largest recent cost per token), never under a
floor, and the full timeout while there is no history yet (the first steps compile, capture graphs, warm caches).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WARM_STEPS = 8  # steps timed before the deadline tightens from the full timeout
HISTORY = 256  # recent steps the estimate looks at


@dataclass
class StepDeadline:
    timeout_s: float  # the ceiling, and the deadline while warming up
    floor_s: float = 5.0  # never less: a loaded host, a first capture or kernel compile stretch steps, and a false
    # alarm costs a recovery
    factor: float = 10.0  # deadline = factor x the expected time
    _recent: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def expected_s(self, n_tokens: int) -> float | None:
        """A generous estimate of a step of `n_tokens`: the cheapest recent step (the fixed cost) plus the largest
        recent cost per token times `n_tokens`; None before `WARM_STEPS` steps."""
        if len(self._recent) < WARM_STEPS:
            return None
        fixed = min(seconds for _, seconds in self._recent)
        per_token = max(seconds / tokens for tokens, seconds in self._recent)
        return fixed + per_token * n_tokens

    def for_step(self, n_tokens: int) -> float:
        expected = self.expected_s(n_tokens)
        if expected is None:
            return self.timeout_s
        return min(self.timeout_s, max(self.floor_s, self.factor * expected))

    def record(self, n_tokens: int, seconds: float) -> None:
        self._recent.append((max(1, n_tokens), seconds))

    def reset(self) -> None:
        """After a recovery: restarted workers warm up again (graphs, caches), so time them afresh."""
        self._recent.clear()

"""Checks of Triton kernels run by Triton's interpreter on the CPU: a script in a fresh Python process, since
TRITON_INTERPRET must be set before any kernel is defined, that prints its findings as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(checks: str, *args: str, unset: tuple[str, ...] = (), timeout: int = 600) -> dict:
    """`checks` run with `args` under TRITON_INTERPRET=1 from the repository root, the variables in `unset` left
    out of its environment; its stdout as JSON. A failure shows the script's stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    for name in unset:
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", checks, *args], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)

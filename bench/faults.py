"""Recovery time per fault, from the fault-injection suite run on a multi-node Ray cluster on this machine.

The scenarios live in tests/cluster/test_faults.py (so CI checks the same behaviour); this runs them and keeps
the timings in bench/results/faults-<machine>.json.

    python bench/faults.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    out = Path("bench/results/faults-cpu.json").resolve()
    env = {**os.environ, "MISTRAL_CLUSTER_FAULTS_OUT": str(out)}
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/cluster/test_faults.py"], env=env)
    if out.is_file():
        for name, r in json.loads(out.read_text())["faults"].items():
            # readiness lost -> back, seen from /health; the standby test reads the router's own recovery time
            seconds = r.get("recovery_seconds", r.get("last_recovery_seconds"))
            print(f"{name:<36} recovery {seconds} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())

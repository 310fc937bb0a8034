"""README's first command installs the package without the `test` extra: the commands and the serving modules must
not import a package only that extra brings. Checked in a subprocess where those packages cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Import names of the `test` extra's packages that the core dependencies do not bring along themselves.
TEST_ONLY = (
    "transformers",
    "openai",
    "httpx",
    "hypothesis",
    "schemathesis",
    "matplotlib",
    "grpc_tools",
    "triton",
    "pytest",
    "guidellm",
)

# None in sys.modules is how Python marks a module absent: `import` raises ModuleNotFoundError, find_spec says None.
WITHOUT_TEST_EXTRA = f"""
import sys

sys.modules.update(dict.fromkeys({TEST_ONLY!r}))
"""


def run_without_test_extra(code: str) -> subprocess.CompletedProcess:
    script = WITHOUT_TEST_EXTRA + textwrap.dedent(code)
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_commands_run_without_the_test_extra(tmp_path):
    checkpoint = tmp_path / "ck"
    result = run_without_test_extra(
        f"""
        from cluster.cli import main
        ck = {str(checkpoint)!r}
        assert main(["make-checkpoint", ck, "--arch", "mixtral", "--layers", "2", "--window", "8"]) == 0
        assert main(["describe", "--checkpoint", ck]) == 0
        assert main(["describe", "--preset", "mixtral-8x7b", "--json"]) == 0
        assert main(["generate", "--checkpoint", ck, "--prompt", "Hello", "--max-tokens", "3", "--json"]) == 0
        """
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert '"token_ids"' in result.stdout


def test_the_serve_app_and_its_command_import_without_the_test_extra():
    result = run_without_test_extra(
        """
        import cluster.cli.serve, cluster.grpc_front, cluster.router_actor, cluster.sharded, cluster.worker_actor
        from cluster.serve import build_app
        from cluster.cli.plan import cmd_plan
        """
    )
    assert result.returncode == 0, result.stderr[-4000:]

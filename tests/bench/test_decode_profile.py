"""bench/decode_profile.py on CPU: the script runs end to end at tiny shapes (the GPU run must not be the first), its
decode steps go through the decode graphs' capture-once-then-replay bookkeeping (on CPU replayed eagerly; whether a
CUDA capture succeeds, which failed silently once on the default stream, only a GPU run says: its JSON's
`captures`), and kernel names sort into the kinds its table compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.decode_profile import kind_of

ROOT = Path(__file__).resolve().parents[2]


def test_a_cpu_dry_run_profiles_replayed_steps(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/decode_profile.py",
            "--cpu-dry-run",
            "--layers",
            "2",
            "--no-compiled",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"ours", "ours_sdpa"}
    for run in runs.values():
        assert "error" not in run, run
        assert run["captures"] == 1 and run["replays"] > 20, run  # captured once, then replayed
        assert run["step_ms"] > 0


def test_kernel_names_sort_into_the_kinds_compared():
    assert kind_of("_gate_up_kernel") == kind_of("_down_kernel") == "expert_gemv"
    assert kind_of("run_attention") == kind_of("merge_runs") == "attention"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kind_of("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT") == "gemm"
    assert kind_of("triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_1") == "gemm"
    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_6") == "triton_fused"
    assert kind_of("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda") == "copy"

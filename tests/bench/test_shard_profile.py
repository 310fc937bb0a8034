"""bench/shard_profile.py on CPU at tiny shapes: the per-shard profile runs end to end before a GPU run needs it, and
its mixed step (running sequences plus new prompts, as served steps are when requests arrive) computes for the running
rows what a decode-only step computes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.shard_profile import profile_components
from shards.make_checkpoint import small_config


@pytest.mark.parametrize("window", [None, 8])  # 8: the running sequences' 12 rows wrapped their buffers
def test_the_profile_runs_and_a_mixed_step_matches_decode_for_the_running_rows(tmp_path, window):
    cfg = replace(small_config("mixtral"), sliding_window=window)
    out = profile_components(cfg, torch.device("cpu"), [2], 2, tmp_path, seed=3, std=0.05)
    assert out["layers"] == 2 and "batch_2" in out and out["prefill_4096"]["tokens"] == (8 if window else 64)
    later = out["prefill_4096_after_12288"]
    assert later["tokens"] == (8 if window else 64) and later["cached"] == 2 * later["tokens"], later
    assert later["ms_per_layer"] > 0 and later["layer_flops"] > 0
    (mixed,) = out["mixed"]
    assert (mixed["running"], mixed["prompts"], mixed["prompt_tokens"]) == (6, 2, 8)
    assert mixed["running_rows_relative_diff"] < 1e-5, mixed  # float32: the same function both ways
    assert mixed["running_rows_median_diff"] < 1e-5 and mixed["running_rows_over_5_percent"] == 0, mixed
    for kind in ("mixed", "decode", "prefill"):
        assert mixed[f"{kind}_ms_per_layer"] > 0
    assert mixed["mixed_over_parts"] > 0 and mixed["host_syncs"] == 0

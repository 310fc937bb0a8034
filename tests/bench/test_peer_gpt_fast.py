"""gpt-fast's model files on our weights compute our model: the peer column of bench/gpu_scale.py compares the same
function. Runs only where a checkout of pytorch-labs/gpt-fast sits in the ignored `.peers/gpt-fast` (never part of
the project; CI has none), on CPU in float32, without compiling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.peer_gpt_fast import GptFast, measure
from router.generation import generate
from router.sampling import SamplingParams
from router.step import StepPlan
from shards.engine import LocalEngine
from tests.conftest import random_prompts

PEER = Path(__file__).resolve().parents[2] / ".peers" / "gpt-fast"
pytestmark = pytest.mark.skipif(not PEER.is_dir(), reason=f"no gpt-fast checkout at {PEER}")
NEW_TOKENS = 12


@pytest.mark.parametrize("arch,seed", [("mixtral", 1), ("mistral", 2)])
def test_gpt_fast_gives_our_logits_and_greedy_tokens_on_our_weights(checkpoint_factory, arch, seed):
    """13-token prompts: two prefill chunks for gpt-fast's Mixtral (8 + 5), one forward for its dense model. The
    logits are the sharp check: a tiny random model's tokens barely depend on its experts (w1 and w3 swapped gives
    the same tokens; the logits move by 3e-2), the logits agree to ~2e-7."""
    ckpt = checkpoint_factory(arch, seed=seed, window=32)
    prompt = random_prompts([13], seed=10 + seed)[0]
    peer = GptFast.build(PEER, ckpt, torch.float32, "cpu", context=len(prompt) + NEW_TOKENS, compile=False)
    ours = LocalEngine(ckpt, max_seqs=1).step(StepPlan([0], [0], [len(prompt)], torch.tensor(prompt)))[0]
    theirs = peer.prefill(prompt)
    assert (ours - theirs).norm() / ours.norm() < 1e-5
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens, times = peer.generate(prompt, NEW_TOKENS)
    assert tokens == generate(LocalEngine(ckpt, max_seqs=1), [prompt], params)[0].token_ids
    assert len(times) == NEW_TOKENS  # a clock reading after each token


def test_gpt_fast_refuses_a_context_past_the_window(checkpoint_factory):
    ckpt = checkpoint_factory("mistral", seed=2, window=16)
    with pytest.raises(ValueError, match="no sliding window"):
        GptFast.build(PEER, ckpt, torch.float32, "cpu", context=24, compile=False)


def test_its_decode_is_measured_as_ours(checkpoint_factory):
    ckpt = checkpoint_factory("mixtral", seed=1, window=32)
    peer = GptFast.build(PEER, ckpt, torch.float32, "cpu", context=24 + 4, compile=False)
    gen = torch.Generator().manual_seed(0)

    def prompts_for(b: int, n: int) -> torch.Tensor:
        return torch.randint(3, 32000, (b, n), generator=gen)

    out = measure(peer, prompts_for, 24, 4, 2, {"ceiling_tokens_per_s": 1e9})
    figures = out["decode"]["1"]
    assert [r["steps"] for r in figures["runs"]] == [3, 3]  # 4 tokens: 3 decode steps timed per call
    assert figures["tokens_per_s"] > 0 and figures["loop_tokens_per_s"] > 0
    assert out["setup"]["decode"].startswith("eager") and out["setup"]["prefill_chunk"] == 8

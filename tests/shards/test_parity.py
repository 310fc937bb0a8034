"""The single-process engine against Hugging Face transformers on the same random weights: exact greedy tokens."""

from __future__ import annotations

import pytest
import torch

from router.generation import generate
from router.sampling import SamplingParams
from router.scheduler import SchedulerConfig
from router.step import StepPlan
from shards.checkpoint import convert_checkpoint
from shards.engine import LocalEngine
from tests.conftest import hf_greedy, random_prompts

NEW_TOKENS = 40


@pytest.mark.parametrize(
    "arch,window,seed",
    [("mistral", 16, 0), ("mistral", 7, 3), ("mixtral", 16, 1), ("mixtral", 24, 2)],
)
def test_greedy_tokens_equal_transformers_for_a_mixed_length_batch(checkpoint_factory, hf_model, arch, window, seed):
    """Prompts shorter than, equal to and several times the window, packed in one batch, generating past it."""
    ckpt = checkpoint_factory(arch, seed=seed, window=window)
    lengths = [3, window, 3 * window + 5]
    prompts = random_prompts(lengths, seed=100 + seed)
    ours = generate(
        LocalEngine(ckpt, max_seqs=len(prompts)), prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    )
    for prompt, result in zip(prompts, ours, strict=True):
        assert result.token_ids == hf_greedy(hf_model(ckpt), prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_chunked_prefill_gives_the_same_tokens_for_any_chunk_size(checkpoint_factory, hf_model, chunk_size):
    ckpt = checkpoint_factory("mixtral", seed=4, window=16)
    prompts = random_prompts([61, 9], seed=7)
    ours = generate(
        LocalEngine(ckpt, max_seqs=2),
        prompts,
        SamplingParams(max_tokens=20, ignore_eos=True),
        SchedulerConfig(max_seqs=2, token_budget=chunk_size + 1, chunk_size=chunk_size),
    )
    for prompt, result in zip(prompts, ours, strict=True):
        assert result.token_ids == hf_greedy(hf_model(ckpt), prompt, 20)


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_last_position_logits_match_transformers(checkpoint_factory, hf_model, arch):
    ckpt = checkpoint_factory(arch, seed=5, window=16)
    prompt = random_prompts([50], seed=11)[0]
    engine = LocalEngine(ckpt, max_seqs=1)
    ours = None
    for start in range(0, len(prompt), 16):  # chunked prefill through the rolling cache
        chunk = prompt[start : start + 16]
        ours = engine.step(StepPlan([0], [start], [len(chunk)], torch.tensor(chunk)))
    with torch.no_grad():
        ref = hf_model(ckpt)(torch.tensor([prompt])).logits[0, -1]
    rel = (ours[0] - ref).norm() / ref.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_model_without_window_matches_transformers(checkpoint_factory, hf_model):
    ckpt = checkpoint_factory("mistral", seed=6, window=None)
    prompts = random_prompts([40, 7], seed=12)
    ours = generate(
        LocalEngine(ckpt, max_seqs=2),
        prompts,
        SamplingParams(max_tokens=16, ignore_eos=True),
        SchedulerConfig(max_seqs=2, chunk_size=12),
    )
    for prompt, result in zip(prompts, ours, strict=True):
        assert result.token_ids == hf_greedy(hf_model(ckpt), prompt, 16)


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_reference_layout_gives_the_same_tokens(checkpoint_factory, hf_model, tmp_path, arch):
    """Convert to params.json + consolidated.safetensors (rotary rows permuted) and load it: same tokens as HF."""
    ckpt = checkpoint_factory(arch, seed=8, window=16)
    ref_dir = convert_checkpoint(ckpt, tmp_path / "reference", layout="reference")
    assert (ref_dir / "params.json").is_file() and (ref_dir / "consolidated.safetensors").is_file()
    back = convert_checkpoint(ref_dir, tmp_path / "back", layout="hf")
    prompts = random_prompts([37, 5], seed=13)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    from_ref = generate(LocalEngine(ref_dir, max_seqs=2), prompts, params)
    from_back = generate(LocalEngine(back, max_seqs=2), prompts, params)
    for prompt, a, b in zip(prompts, from_ref, from_back, strict=True):
        expected = hf_greedy(hf_model(ckpt), prompt, 24)
        assert a.token_ids == expected
        assert b.token_ids == expected


def test_sharded_checkpoint_with_index_loads_the_same_model(checkpoint_factory, hf_model):
    ckpt = checkpoint_factory("mixtral", seed=9, window=16, max_shard_bytes=2_000_000)
    assert (ckpt / "model.safetensors.index.json").is_file()
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    prompt = random_prompts([30], seed=14)[0]
    ours = generate(LocalEngine(ckpt, max_seqs=1), [prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    assert ours[0].token_ids == hf_greedy(hf_model(ckpt), prompt, 12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_converts_dtype_and_stays_close(checkpoint_factory, dtype):
    ckpt = checkpoint_factory("mixtral", seed=10, window=16)
    engine = LocalEngine(ckpt, dtype=dtype, max_seqs=1)
    assert all(p.dtype == dtype for p in engine.model.parameters())
    full = LocalEngine(ckpt, max_seqs=1)
    prompt = torch.tensor(random_prompts([12], seed=15)[0])
    a = engine.step(StepPlan([0], [0], [12], prompt))
    b = full.step(StepPlan([0], [0], [12], prompt))
    assert ((a - b).norm() / b.norm()) < 5e-2


def test_seeded_sampling_is_reproducible_and_batch_independent(checkpoint_factory):
    ckpt = checkpoint_factory("mixtral", seed=0, window=16)
    prompts = random_prompts([9, 20], seed=16)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    together = generate(LocalEngine(ckpt, max_seqs=2), prompts, params)
    alone = generate(LocalEngine(ckpt, max_seqs=1), prompts[:1], params)
    assert together[0].token_ids == alone[0].token_ids
    other_seed = generate(LocalEngine(ckpt, max_seqs=1), prompts[:1], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed[0].token_ids != alone[0].token_ids

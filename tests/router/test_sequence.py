"""A sequence's tokens as the scheduler reads them each step, and its identity."""

from __future__ import annotations

from router.sampling import SamplingParams
from router.scheduler import Sequence


def test_token_run_is_the_slice_of_prompt_and_output_at_every_boundary():
    seq = Sequence(0, [10, 11, 12, 13], SamplingParams(max_tokens=8))
    seq.output_ids = [20, 21, 22]
    for start in range(seq.n_tokens + 1):
        for n in range(0, seq.n_tokens - start + 2):
            assert seq.token_run(start, n) == seq.tokens[start : start + n], (start, n)
    assert seq.n_tokens == len(seq.tokens) == 7


def test_sequences_are_equal_only_to_themselves():
    """Two requests with the same prompt and params are two sequences: `in`, `index` and `remove` must not mix them."""
    a, b = Sequence(0, [1, 2], SamplingParams()), Sequence(0, [1, 2], SamplingParams())
    assert a != b and a == a
    running = [a, b]
    running.remove(b)
    assert running == [a] and running[0] is a

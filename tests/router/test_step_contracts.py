"""Every message that crosses a process boundary is a frozen dataclass defined in router/step.py: a receiver can
neither mutate what it was sent nor be sent a loose dict in its place."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import router.step as step
from router.step import StepPlan


def contract_types() -> list[type]:
    return [c for _, c in inspect.getmembers(step, inspect.isclass) if c.__module__ == step.__name__]


@pytest.mark.parametrize("cls", contract_types(), ids=lambda c: c.__name__)
def test_each_contract_is_a_frozen_dataclass(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_the_contracts_named_in_the_design_are_all_there():
    names = {c.__name__ for c in contract_types()}
    assert {"StepPlan", "StageResult", "StepOutput", "Admission", "TokenEvent", "RouterStats", "RouterHealth"} <= names


def test_a_plan_is_normalised_to_tuples_and_numpy_token_ids():
    plan = StepPlan([3, 1], [0, 5], [2, 1], token_ids=[7, 8, 9], want_logits=[False, True], greedy=[1, 0])
    assert plan.slots == (3, 1) and plan.lengths == (2, 1) and plan.greedy == (True, False)
    assert isinstance(plan.token_ids, np.ndarray) and plan.token_ids.dtype == np.int64
    assert plan.logit_rows() == [2] and plan.greedy_logit_rows() == (False,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slots = (0,)


def test_a_plan_with_mismatched_fields_is_refused():
    with pytest.raises(ValueError, match="got 2 slots, 1 starts, 2 lengths"):
        StepPlan([0, 1], [0], [1, 1])


def test_a_scored_plan_scores_every_row_but_a_last_that_wants_a_token():
    plan = StepPlan(
        [0, 1, 2],
        [0, 4, 0],
        [4, 3, 2],
        want_logits=[False, True, True],
        scored=[1, 1, 0],
        score_targets=[5, 6, 7, 8, 9, 1],
    )
    assert plan.scored_lengths() == (4, 2, 0) and plan.score_rows() == [0, 1, 2, 3, 4, 5]
    assert plan.without_tokens().score_targets.tolist() == [5, 6, 7, 8, 9, 1]  # the last stage needs them
    with pytest.raises(ValueError, match="scoring 6 rows has 5 targets"):
        StepPlan([0, 1], [0, 4], [4, 3], want_logits=[False, True], scored=[1, 1], score_targets=[5, 6, 7, 8, 9])

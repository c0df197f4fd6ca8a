"""The promotion gate, as a table."""

import pytest

from zhllama.core.registry import floor, gate
from zhllama.recipes.chinese_llama_alpaca.configs import RegisterConfig

RULE = ["final_bits_per_char:min", "task_accuracy_loglik:max"]
CHAMPION = {"final_bits_per_char": 5.0, "task_accuracy_loglik": 0.60}

CASES = [
    ("first version", None, {}, True, "no champion"),
    ("better on both", {"final_bits_per_char": 4.5, "task_accuracy_loglik": 0.7}, {}, True, "better on"),
    (
        "better on one, equal on the other",
        {"final_bits_per_char": 4.9, "task_accuracy_loglik": 0.6},
        {},
        True,
        "better on final_bits_per_char",
    ),
    ("identical", dict(CHAMPION), {}, False, "no gain"),
    (
        "worse on one",
        {"final_bits_per_char": 4.0, "task_accuracy_loglik": 0.59},
        {},
        False,
        "worse on task_accuracy_loglik",
    ),
    (
        "small loss tolerated",
        {"final_bits_per_char": 4.0, "task_accuracy_loglik": 0.59},
        {"max_regression": 0.02},
        True,
        "better on",
    ),
    (
        "gain below the minimum",
        {"final_bits_per_char": 4.99, "task_accuracy_loglik": 0.6},
        {"min_improvement": 0.05},
        False,
        "no gain",
    ),
]


@pytest.mark.parametrize(("case", "candidate", "rule", "promote", "reason"), CASES, ids=[c[0] for c in CASES])
def test_gate(case, candidate, rule, promote, reason) -> None:
    """Champion against challenger, every candidate above a floor of accuracy > majority share 0.5."""
    cfg = RegisterConfig(
        promotion_metrics=RULE, floor_thresholds=[], floor_margin_over_majority=0.0, **{"max_regression": 0.0, **rule}
    )
    new = {**(candidate or {"final_bits_per_char": 6.0, "task_accuracy_loglik": 0.55}), "task_majority_share": 0.5}
    decided, why, compared = gate(new, CHAMPION if candidate is not None else None, cfg)
    assert decided is promote and reason in why
    if candidate is not None:
        assert compared["final_bits_per_char"]["champion"] == 5.0


def test_bad_promotion_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="NAME:max or NAME:min"):
        RegisterConfig(promotion_metrics=["final_bits_per_char:lower"])


FLOOR_CASES = [
    # (case, accuracy, majority share, floor settings, passes, in the reason)
    ("chance level", 0.52, 0.54, {}, False, "minimum absolute change check failed"),
    ("above majority, below the margin", 0.60, 0.54, {}, False, "minimum absolute change"),
    ("above the margin, below the absolute threshold", 0.58, 0.40, {}, False, "threshold check failed"),
    ("good", 0.85, 0.54, {}, True, "above the floor"),
    (
        "margin 0: merely beating the majority",
        0.55,
        0.54,
        {"floor_margin_over_majority": 0.0, "floor_thresholds": []},
        True,
        "above",
    ),
    (
        "equal to the majority never passes",
        0.54,
        0.54,
        {"floor_margin_over_majority": 0.0, "floor_thresholds": []},
        False,
        "below",
    ),
    ("a lower-is-better threshold", 0.85, 0.54, {"floor_thresholds": ["sft_test_loss<=0.5"]}, False, "sft_test_loss"),
]


@pytest.mark.parametrize(
    ("case", "acc", "majority", "settings", "passes", "reason"), FLOOR_CASES, ids=[c[0] for c in FLOOR_CASES]
)
def test_floor_holds_even_without_a_champion(case, acc, majority, settings, passes, reason) -> None:
    """The floor (mlflow.validate_evaluation_results against the majority-class baseline) applies to
    the first version too: with no champion, a chance-level model is refused."""
    cfg = RegisterConfig(promotion_metrics=["task_accuracy_loglik:max"], **settings)
    candidate = {"task_accuracy_loglik": acc, "task_majority_share": majority, "sft_test_loss": 0.7}
    assert floor(candidate, cfg)[0] is passes
    decided, why, _ = gate(candidate, None, cfg)
    assert decided is passes and reason in why
    if not passes:
        assert why.startswith("below the floor")


def test_bad_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="NAME>=NUMBER"):
        RegisterConfig(floor_thresholds=["task_accuracy_loglik>high"])
    with pytest.raises(ValueError, match="floor_margin_over_majority"):
        RegisterConfig(floor_margin_over_majority=-0.1)

"""The promotion gate, as a table."""

import pytest

from zhllama.core.registry import gate
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
    cfg = RegisterConfig(promotion_metrics=RULE, **{"max_regression": 0.0, **rule})
    new = candidate or {"final_bits_per_char": 6.0, "task_accuracy_loglik": 0.1}
    decided, why, compared = gate(new, CHAMPION if candidate is not None else None, cfg)
    assert decided is promote and reason in why
    if candidate is not None:
        assert compared["final_bits_per_char"]["champion"] == 5.0


def test_bad_promotion_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="NAME:max or NAME:min"):
        RegisterConfig(promotion_metrics=["final_bits_per_char:lower"])

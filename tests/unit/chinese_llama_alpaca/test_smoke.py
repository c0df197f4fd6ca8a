"""What the smoke test counts as an answer, and which prompts it sends (no server here; the
server itself is tested in tests/integration/test_serving.py)."""

import pytest

from zhllama.core.io import InputError, write_json
from zhllama.core.model_server import Answer
from zhllama.recipes.chinese_llama_alpaca.smoke import check_answer, smoke_prompts

ANSWERS = {
    "one string": (Answer(200, {"predictions": ["正面"]}, 0.5), ""),
    "server error": (Answer(500, {"message": "boom"}, 0.5), "status 500"),
    "client error": (Answer(400, {"message": "bad"}, 0.5), "status 400"),
    "too slow": (Answer(200, {"predictions": ["正面"]}, 61.0), "took 61.0 s"),
    "empty": (Answer(200, {"predictions": ["  "]}, 0.5), "empty answer"),
    "not JSON": (Answer(200, "<html>", 0.5), "not one string answer"),
    "two answers": (Answer(200, {"predictions": ["a", "b"]}, 0.5), "not one string answer"),
    "not a string": (Answer(200, {"predictions": [3]}, 0.5), "not one string answer"),
}


@pytest.mark.parametrize("case", list(ANSWERS), ids=list(ANSWERS))
def test_check_answer(case) -> None:
    answer, why = ANSWERS[case]
    assert (check_answer(answer, limit=60.0) == "") if not why else why in check_answer(answer, limit=60.0)


def test_prompts_are_the_samples_then_the_first_task_items(tmp_path) -> None:
    write_json(
        tmp_path / "metrics.json",
        {
            "samples": [{"instruction": "中国的首都是哪里？", "input": "", "response": "北京"}],
            "task": {
                "greedy_examples": [
                    {"instruction": "判断", "input": f"评论{i}", "gold": "正面", "greedy": "正面"} for i in range(5)
                ]
            },
        },
    )
    prompts = smoke_prompts(tmp_path, task_items=2)
    assert prompts == [
        {"instruction": "中国的首都是哪里？", "input": ""},
        {"instruction": "判断", "input": "评论0"},
        {"instruction": "判断", "input": "评论1"},
    ]


def test_an_evaluation_without_prompts_is_refused(tmp_path) -> None:
    write_json(tmp_path / "metrics.json", {"summary": {}})
    with pytest.raises(InputError, match="metrics.json: no samples or task items"):
        smoke_prompts(tmp_path, task_items=3)

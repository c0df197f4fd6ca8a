"""C-Eval/CMMLU-style multiple-choice scoring on tiny CSVs built here (the real sets are not
shipped: their licences are non-commercial)."""

import csv
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zhllama.core.io import InputError, read_json
from zhllama.recipes.chinese_llama_alpaca import mcq
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer

SUBJECTS = ("high_school_physics", "中国历史")


def write_subject(
    path: Path, rows: list[dict[str, str]], header=("id", "Question", "A", "B", "C", "D", "Answer")
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for k, row in enumerate(rows):
            writer.writerow([k if h == "id" else row[h] for h in header])


def make_questions(n: int, seed: int, tag: str) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        options = {c: f"{tag}选项{k}{c}" for c in mcq.CHOICES}
        rows.append({"Question": f"{tag}第{k}题：哪一个是对的？", **options, "Answer": rng.choice(mcq.CHOICES)})
    return rows


@pytest.fixture()
def mcq_dir(tmp_path: Path) -> Path:
    """C-Eval's layout (dev/<subject>_dev.csv, val/<subject>_val.csv) for two subjects."""
    root = tmp_path / "ceval"
    for i, subject in enumerate(SUBJECTS):
        write_subject(root / "dev" / f"{subject}_dev.csv", make_questions(5, 100 + i, f"{subject}示例"))
        write_subject(root / "val" / f"{subject}_val.csv", make_questions(60, i, subject))
    return root


class Oracle(torch.nn.Module):
    """A "model" that knows the answers: it reads the question before the final 答案： back from
    the ids and puts its logit on the answer letter (both spellings the scorer adds up)."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.bare, self.after = mcq.letter_token_ids(tokenizer)
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.calls = 0

    def forward(self, input_ids, attention_mask, use_cache=False):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            text = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            question = text.rsplit("\n\n", 1)[-1].split("\n", 1)[0]
            letter = mcq.CHOICES.index(self.answers[question])
            logits[row, int(mask.sum()) - 1, self.bare[letter]] += 5.0
            logits[row, int(mask.sum()) - 1, self.after[letter]] += 5.0
        return SimpleNamespace(logits=logits)


def answers_of(root: Path) -> dict[str, str]:
    found = {}
    for path in (root / "val").glob("*.csv"):
        for item in mcq.read_questions(path):
            found[item.question] = item.answer
    return found


def test_prompt_is_chinese_llama_alpaca_2s(mcq_dir: Path) -> None:
    shots = mcq.read_questions(mcq_dir / "dev" / "中国历史_dev.csv")[:2]
    item = mcq.read_questions(mcq_dir / "val" / "中国历史_val.csv")[0]
    prompt, used = mcq.fit_prompt("中国历史", shots, item, len, 10_000)
    first = shots[0]
    options = "".join(f"\n{c}. {o}" for c, o in zip(mcq.CHOICES, first.options, strict=True))
    expected_shot = f"{first.question}{options}\n答案：{first.answer}\n\n"
    assert used == 2
    assert prompt.startswith("以下是中国关于中国历史考试的单项选择题，请选出其中的正确答案。\n\n" + expected_shot)
    assert prompt.endswith(
        f"{item.question}\nA. {item.options[0]}\nB. {item.options[1]}\nC. {item.options[2]}\nD. {item.options[3]}\n答案："
    )


def test_shots_are_dropped_never_the_item(mcq_dir: Path) -> None:
    shots = mcq.read_questions(mcq_dir / "dev" / "中国历史_dev.csv")
    item = mcq.read_questions(mcq_dir / "val" / "中国历史_val.csv")[0]
    whole, _ = mcq.fit_prompt("中国历史", shots, item, len, 10_000)
    zero, _ = mcq.fit_prompt("中国历史", [], item, len, 10_000)
    prompt, used = mcq.fit_prompt("中国历史", shots, item, len, len(whole) - 1)
    assert used == len(shots) - 1 and prompt.endswith(zero[zero.index("\n\n") + 2 :])
    assert mcq.fit_prompt("中国历史", shots, item, len, len(zero))[1] == 0
    with pytest.raises(ValueError):
        mcq.fit_prompt("中国历史", shots, item, len, len(zero) - 1)


def test_a_model_that_knows_the_answers_scores_one_and_a_shuffled_one_chance(mcq_dir: Path, tiny_base: Path) -> None:
    tokenizer = load_tokenizer(tiny_base)
    answers = answers_of(mcq_dir)
    perfect = mcq.score_mcq(Oracle(tokenizer, answers), tokenizer, mcq_dir, shots=5, batch_size=7)
    assert perfect["mean_accuracy"] == 1.0 and perfect["questions"] == 120
    assert set(perfect["subjects"]) == set(SUBJECTS) and perfect["split"] == "val"
    assert all(s["questions"] == 60 and s["accuracy"] == 1.0 for s in perfect["subjects"].values())
    rng = random.Random(0)
    shuffled = {q: rng.choice(mcq.CHOICES) for q in answers}
    guess = mcq.score_mcq(Oracle(tokenizer, shuffled), tokenizer, mcq_dir, shots=5)
    assert 0.1 < guess["mean_accuracy"] < 0.4 and guess["chance"] == 0.25


def test_bounds_shots_and_cmmlu_layout(tmp_path: Path, tiny_base: Path) -> None:
    """CMMLU: dev/<subject>.csv and test/<subject>.csv, an unnamed first column, 0-shot on request."""
    root = tmp_path / "cmmlu"
    header = ("", "Question", "A", "B", "C", "D", "Answer")
    write_subject(root / "dev" / "anatomy.csv", make_questions(5, 1, "dev"))
    rows = make_questions(30, 2, "t")
    path = root / "test" / "anatomy.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([k, *(r[h] for h in header[1:])] for k, r in enumerate(rows))
    tokenizer = load_tokenizer(tiny_base)
    oracle = Oracle(tokenizer, {r["Question"]: r["Answer"] for r in rows})
    scored = mcq.score_mcq(oracle, tokenizer, root, shots=0, max_per_subject=10, batch_size=4)
    assert scored["split"] == "test" and scored["shots"] == 0 and scored["questions"] == 10
    assert set(scored["subjects"]) == {"anatomy"}
    assert scored["mean_accuracy"] == 1.0 and oracle.calls == 3  # batched: 10 questions in 3 forward passes


def test_a_real_model_scores_within_its_context(mcq_dir: Path, tiny_base: Path) -> None:
    """The tiny random LLaMA: every question scored, shots dropped where 5 do not fit its context."""
    model, tokenizer = load_model(tiny_base), load_tokenizer(tiny_base)
    scored = mcq.score_mcq(model, tokenizer, mcq_dir, shots=5, max_per_subject=8, max_tokens=200)
    assert scored["questions"] == 16 and scored["shots_dropped"] > 0 and scored["not_scored"] == 0
    assert 0.0 <= scored["mean_accuracy"] <= 1.0
    assert sum(scored["predicted_share"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"val/x_val.csv": "Question,A,B,C\nq,1,2,3\n"}, "missing column"),
        ({"val/x_val.csv": "Question,A,B,C,D,Answer\nq,1,2,3,4,E\n"}, "Answer 'E'"),
        ({"dev/x_dev.csv": "Question,A,B,C,D,Answer\n"}, "neither val/ nor test/"),
        ({"val/readme.txt": "no csv"}, "no .csv files"),
    ],
)
def test_bad_folders_name_the_file(tmp_path: Path, tiny_base: Path, layout: dict[str, str], message: str) -> None:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    tokenizer = load_tokenizer(tiny_base)
    with pytest.raises(InputError, match=message):
        mcq.score_mcq(load_model(tiny_base), tokenizer, tmp_path)


def test_cli_scores_a_ceval_folder(mcq_dir: Path, pt_merged: Path, small_corpus, tmp_path: Path) -> None:
    """`zhllama evaluate --mcq_dir DIR`: per-subject and mean accuracy in metrics.json and the report."""
    out = tmp_path / "eval"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = [sys.executable, "-m", "zhllama.cli"]
    cmd += ["evaluate", "--text", str(small_corpus["valid"]), "--tasks", "", "--base_model", "", "--final_model", ""]
    cmd += ["--pt_model", str(pt_merged), "--vocab", "", "--pt_run", "", "--sft_run", "", "--out", str(out)]
    cmd += ["--mcq_dir", str(mcq_dir), "--mcq_max_per_subject", "4", "--lm_max_lines", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = read_json(out / "metrics.json")
    scored = metrics["mcq"]["pt_merged"]
    assert scored["questions"] == 8 and set(scored["subjects"]) == set(SUBJECTS)
    assert metrics["summary"]["pt_merged_mcq_accuracy"] == scored["mean_accuracy"]
    assert "pt_merged_mcq_accuracy.中国历史" in metrics["summary"]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Multiple choice (C-Eval / CMMLU style)" in report and "中国历史" in report

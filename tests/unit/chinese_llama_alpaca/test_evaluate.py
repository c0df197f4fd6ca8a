import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_eval
from zhllama.core.io import InputError, read_json
from zhllama.core.training.loss import token_loss_sum
from zhllama.recipes.chinese_llama_alpaca.evaluate import (
    EvalInputs,
    language_model_scores,
    run_evaluate,
    task_metrics,
    text_chunks,
)
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer
from zhllama.recipes.chinese_llama_alpaca.scoring import sequence_logprobs
from zhllama.recipes.chinese_llama_alpaca.sft import read_alpaca, tokenize_example


def test_chunks_keep_every_character() -> None:
    lines = ["一二三四五六七", "八九", "   "]
    chunks = text_chunks(lines, 3)
    assert "".join(chunks) == "一二三四五六七八九"
    assert max(len(c) for c in chunks) == 3


def test_bits_per_char_do_not_depend_on_batching(pt_merged: Path, small_corpus) -> None:
    model, tok = load_model(pt_merged), load_tokenizer(pt_merged)
    chunks = text_chunks(small_corpus["valid"].read_text(encoding="utf-8").splitlines()[:6], 64)
    one = language_model_scores(model, tok, chunks, batch_size=1)
    many = language_model_scores(model, tok, chunks, batch_size=5)
    assert one["tokens"] == many["tokens"] and one["chars"] == sum(len(c) for c in chunks)
    assert many["bits_per_char"] == pytest.approx(one["bits_per_char"], rel=1e-5)
    # the three figures are one measurement: log2(token perplexity) * tokens = bits/char * chars
    assert math.log2(one["token_perplexity"]) * one["tokens"] == pytest.approx(
        one["bits_per_char"] * one["chars"], rel=1e-6
    )
    assert one["bits_per_byte"] * one["bytes"] == pytest.approx(one["bits_per_char"] * one["chars"], rel=1e-9)


def test_sequence_logprobs_equal_the_training_loss(pt_merged: Path, monkeypatch) -> None:
    """The output layer on the label positions alone gives what the full logits give (and the
    training loss), padded rows of different lengths in one batch included."""
    from zhllama.recipes.chinese_llama_alpaca import scoring

    model, tok = load_model(pt_merged), load_tokenizer(pt_merged)
    rows = [
        tokenize_example(tok, {"instruction": "判断情感", "input": text, "output": out}, 128)
        for text, out in (("很好", "正面"), ("太差了，不会再买", "负面"), ("一般般吧，物流还行，包装有点破", "负面"))
    ]
    scores = sequence_logprobs(model, rows, 0, batch_size=3)
    for (ids, labels), (logp, count) in zip(rows, scores, strict=True):
        with torch.no_grad():
            loss, n = token_loss_sum(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
        assert n == count
        assert logp == pytest.approx(-loss.item(), rel=1e-4)
    monkeypatch.setattr(scoring, "plain_output_head", lambda model: None)  # the generic path, full logits
    full = sequence_logprobs(model, rows, 0, batch_size=3)
    for (logp, count), (ref, ref_count) in zip(scores, full, strict=True):
        assert count == ref_count and logp == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_task_metrics_rank_the_options(tiny_final: Path, tiny_sft_data, tmp_path: Path) -> None:
    model, tok = load_model(tiny_final), load_tokenizer(tiny_final)
    result = task_metrics(model, tok, tiny_sft_data["test"], tiny_eval())
    assert result["options"] == ["正面", "负面"]
    assert result["examples"] == 8
    assert sum(result["predicted_share"].values()) == pytest.approx(1.0)
    assert result["test_loss"] > 0
    # accuracy is the share of examples whose best-scored option is the gold one: the predictions
    # do not depend on the gold labels, so relabelling every example flips the accuracy
    greedy = result["greedy_examples"]
    assert result["exact_match"] == pytest.approx(sum(g["greedy"] == g["gold"].strip() for g in greedy) / len(greedy))
    for label in result["options"]:
        relabelled = tmp_path / f"all-{label}.json"
        records = [{**r, "output": label} for r in read_alpaca(tiny_sft_data["test"])]
        relabelled.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        same_gold = task_metrics(model, tok, relabelled, tiny_eval(task_options=result["options"]))
        assert same_gold["accuracy_loglik"] == pytest.approx(result["predicted_share"][label])


def test_greedy_exact_match_on_a_prefix_leaves_the_ranking_whole(tiny_final: Path, tiny_sft_data) -> None:
    """task_greedy_max_examples bounds only the greedy decoding: every example is still ranked,
    and the greedy answers of the prefix are those of the whole run."""
    model, tok = load_model(tiny_final), load_tokenizer(tiny_final)
    whole = task_metrics(model, tok, tiny_sft_data["test"], tiny_eval(task_greedy_max_examples=0))
    part = task_metrics(model, tok, tiny_sft_data["test"], tiny_eval(task_greedy_max_examples=3))
    assert (whole["examples"], whole["greedy_examples_scored"]) == (8, 8)
    assert (part["examples"], part["greedy_examples_scored"]) == (8, 3)
    assert part["accuracy_loglik"] == whole["accuracy_loglik"] and part["test_loss"] == whole["test_loss"]
    assert part["greedy_examples"] == whole["greedy_examples"][:3]
    first = [g["greedy"] == g["gold"].strip() for g in whole["greedy_examples"][:3]]
    assert part["exact_match"] == pytest.approx(sum(first) / 3)
    with pytest.raises(ValueError, match="task_greedy_max_examples must be >= 0"):
        tiny_eval(task_greedy_max_examples=-1)


def test_evaluation_writes_metrics_and_report(eval_run: Path) -> None:
    metrics = read_json(eval_run / "metrics.json")
    summary = metrics["summary"]
    for role in ("base", "pt_merged", "final"):
        assert summary[f"{role}_bits_per_char"] > 0
    # the merged tokenizer needs fewer tokens per character than the base one on the same text
    assert summary["pt_merged_tokens_per_char"] < summary["base_tokens_per_char"]
    assert summary["tokens_per_zh_char_merged"] < summary["tokens_per_zh_char_base"]
    assert {"task_accuracy_loglik", "task_exact_match", "sft_test_loss", "sft_valid_loss", "pt_valid_loss"} <= set(
        summary
    )
    assert len(metrics["samples"]) == 2 and all(isinstance(s["response"], str) for s in metrics["samples"])
    plots = {p.name for p in (eval_run / "plots").iterdir()}
    assert {"loss_curves.png", "bits_per_char.png", "token_efficiency.png", "task.png", "accuracy_curve.png"} <= plots
    html = (eval_run / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 5  # self-contained: renders as a Kubeflow HTML artifact
    assert "Generation samples" in html and "请用一句话介绍北京。" in html
    # one line each: the majority baseline, and whether SFT kept the language model
    task = metrics["task"]
    assert summary["task_majority_share"] == task["majority_share"] == max(task["gold_share"].values())
    word = "beat" if task["accuracy_loglik"] > task["majority_share"] else "did not beat"
    assert f"This run {word} the majority baseline: task accuracy {task['accuracy_loglik']:.3f}" in html
    assert "the language model: held-out bits/char" in html


def test_pt_merged_beats_random_base_in_bits_per_char(eval_run: Path) -> None:
    summary = read_json(eval_run / "metrics.json")["summary"]
    assert summary["pt_merged_bits_per_char"] < summary["base_bits_per_char"]


def test_bad_input_leaves_no_output(tmp_path: Path, tiny_base: Path, small_corpus) -> None:
    out = tmp_path / "eval"
    with pytest.raises(InputError, match="no weights"):
        empty = tmp_path / "empty_model"
        empty.mkdir()
        (empty / "config.json").write_text("{}")
        run_evaluate(EvalInputs(text_file=small_corpus["valid"], base_model=empty), out, tiny_eval())
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的\n".encode() + b"\xff\xfe\n")
    with pytest.raises(InputError, match=r"bad.txt:2: not UTF-8"):
        run_evaluate(EvalInputs(text_file=bad, base_model=tiny_base), out, tiny_eval())
    with pytest.raises(InputError, match="at least one model"):
        run_evaluate(EvalInputs(text_file=small_corpus["valid"]), out, tiny_eval())
    assert not out.exists() and not list(tmp_path.glob(".eval.tmp-*"))


def test_readme_block_comes_from_the_run(eval_run: Path, tmp_path: Path) -> None:
    """`make run` rewrites the README's default-run block from the evaluation it just made."""
    from pipelines.local import README_BEGIN, README_END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\n(old figures)\n{README_END}\nafter\n", encoding="utf-8")
    run = {
        "total_seconds": 312.0,
        "pipeline_run_id": "run-1",
        "step_seconds": {"a": 1.0},
        "evaluation_metrics": str(eval_run / "metrics.json"),
    }
    update_readme(readme, {**run, "registered": {"decision": "promoted", "reason": "above the floor"}})
    text = readme.read_text(encoding="utf-8")
    summary = read_json(eval_run / "metrics.json")["summary"]
    assert "(old figures)" not in text and text.endswith(f"{README_END}\nafter\n")
    assert "Pipeline run `run-1`: 5.2 min" in text and "Registration: promoted: above the floor." in text
    assert f"| PT merged | {summary['pt_merged_bits_per_char']:.3f} | +0.0% |" in text
    assert text.index("| base |") < text.index("| PT merged |") < text.index("| final (PT+SFT) |")  # the roles' order
    assert f"accuracy {summary['task_accuracy_loglik']:.3f} by log-likelihood" in text

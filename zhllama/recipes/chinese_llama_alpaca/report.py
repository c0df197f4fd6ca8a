"""The evaluation report: one self-contained HTML page (plots inline, so it renders as a Kubeflow
HTML artifact or an MLflow artifact preview) and the plots as PNG files beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"
MODEL_LABELS = {
    "base": "base",
    "pt_base_vocab": "PT, base vocab only",
    "pt_merged": "PT merged",
    "final": "final (PT+SFT)",
}
FORGETTING_LIMIT = 0.10  # the final model's bits/char may exceed the PT-merged model's by this share
# Latin from DejaVu, Chinese (labels, task options, sample prompts) from the first CJK font installed
# (matplotlib falls back glyph by glyph along font.family): the images carry WenQuanYi Micro Hei.
FONTS = ["DejaVu Sans", "WenQuanYi Micro Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display in containers or CI
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    plt.rcParams["font.family"] = [name for name in FONTS if name in installed] or [
        "sans-serif"
    ]  # a list: per-glyph fallback

    return plt


def plot_loss_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    if not logs:
        return False
    plt = _figure()
    fig, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 3.6), squeeze=False)
    for ax, (stage, history) in zip(axes[0], logs.items(), strict=True):
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy_curve(
    history: list[dict[str, Any]], majority: float | None, path: Path, test_accuracy: float | None = None
) -> bool:
    """Validation accuracy against SFT steps (logged at every evaluation of a closed-answer task),
    and the final model's held-out test accuracy at the last step."""
    points = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    if not points:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot(*zip(*points, strict=True), "o-", label="validation accuracy (log-likelihood)")
    if test_accuracy is not None:
        ax.plot(
            [points[-1][0]], [test_accuracy], "*", markersize=12, label=f"test accuracy, final ({test_accuracy:.2f})"
        )
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle="--", label=f"majority class ({majority:.2f})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("SFT optimizer step")
    ax.set_ylabel("share correct")
    ax.set_title("Task accuracy against SFT steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def verdict(result: dict[str, Any]) -> list[str]:
    """One line each: did the run beat the majority baseline; did SFT keep the language model."""
    lines = []
    task = result.get("task")
    if task:
        acc, majority = task["accuracy_loglik"], task["majority_share"]
        word = "beat" if acc > majority else "did not beat"
        lines.append(
            f"This run {word} the majority baseline: task accuracy {acc:.3f} against {majority:.3f} "
            f"(always answering the commonest option), {acc - majority:+.3f}."
        )
    lm = result["language_model"]
    if "final" in lm and "pt_merged" in lm:
        ratio = lm["final"]["bits_per_char"] / lm["pt_merged"]["bits_per_char"] - 1
        kept = "kept" if ratio <= FORGETTING_LIMIT else "did not keep"
        lines.append(
            f"SFT {kept} the language model: held-out bits/char {lm['final']['bits_per_char']:.3f} after SFT against "
            f"{lm['pt_merged']['bits_per_char']:.3f} after PT ({ratio:+.1%}; the limit is +{FORGETTING_LIMIT:.0%})."
        )
    return lines


def _bars(path: Path, title: str, ylabel: str, labels: list[str], series: dict[str, list[float]]) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bits_per_char(lm: dict[str, dict[str, float]], path: Path) -> bool:
    if not lm:
        return False
    roles = list(lm)
    _bars(
        path,
        "Held-out text: lower is better",
        "bits",
        [MODEL_LABELS.get(r, r) for r in roles],
        {"bits/char": [lm[r]["bits_per_char"] for r in roles], "bits/byte": [lm[r]["bits_per_byte"] for r in roles]},
    )
    return True


def plot_token_efficiency(tokenizer: dict[str, Any] | None, path: Path) -> bool:
    if not tokenizer:
        return False
    labels = [f"base ({tokenizer['base_vocab_size']:,})", f"merged ({tokenizer['merged_vocab_size']:,})"]
    _bars(
        path,
        "Tokens per character: lower is better",
        "tokens",
        labels,
        {
            "per Chinese char": [
                tokenizer["base"]["tokens_per_chinese_char"],
                tokenizer["merged"]["tokens_per_chinese_char"],
            ],
            "per char": [tokenizer["base"]["tokens_per_char"], tokenizer["merged"]["tokens_per_char"]],
        },
    )
    return True


def plot_task(task: dict[str, Any] | None, path: Path) -> bool:
    if not task:
        return False
    majority = task.get("majority_share", max(task["gold_share"].values()))
    _bars(
        path,
        f"Task accuracy on {task['examples']} test examples",
        "share correct",
        ["log-likelihood", "greedy exact match", "majority class"],
        {"accuracy": [task["accuracy_loglik"], task["exact_match"], majority]},
    )
    return True


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return html.escape(str(value)).replace("\n", "<br>")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = f"{html.escape(alt)} ({PLOTS_DIR}/{path.name})"
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}figure{display:inline-block;margin:.5em}img{max-width:100%}h2{margin-top:1.6em}"""


def _mcq_section(scored: dict[str, dict[str, Any]] | None) -> list[str]:
    if not scored:
        return []
    roles = list(scored)
    first = scored[roles[0]]
    subjects = sorted({name for s in scored.values() for name in s["subjects"]})
    rows = [
        [name, first["subjects"].get(name, {}).get("questions", "")]
        + [s["subjects"][name]["accuracy"] if name in s["subjects"] else "" for s in scored.values()]
        for name in subjects
    ]
    rows.append(["mean over subjects", first["questions"]] + [s["mean_accuracy"] for s in scored.values()])
    rows.append(["chance", ""] + [s["chance"] for s in scored.values()])
    return [
        "<h2>Multiple choice (C-Eval / CMMLU style)</h2>",
        f"<p>{first['split']} split, {first['shots']}-shot, scored by the next-token logits of A-D after 答案： "
        f"(Chinese-LLaMA-Alpaca-2's prompt); {first['questions']} questions, {first['not_scored']} too long to score, "
        f"{first['shots_dropped']} shots dropped to fit the context. Chance is {first['chance']:.2f}.</p>",
        _table(["subject", "questions", *(MODEL_LABELS.get(r, r) for r in roles)], rows),
    ]


def write_report(out_dir: Path, result: dict[str, Any], logs: dict[str, list[dict[str, Any]]]) -> Path:
    """Write ``report.html`` and ``plots/*.png`` into ``out_dir``; returns the HTML path."""
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>zhllama evaluation</title><style>{STYLE}</style>",
        "<h1>zhllama evaluation</h1>",
        f"<p>Held-out text: {html.escape(result['text_file'])} ({result['text_lines']} lines). "
        "Bits per character compare models with different tokenizers; per-token perplexity does not.</p>",
    ]
    parts.extend(f"<p><b>{html.escape(line)}</b></p>" for line in verdict(result))
    lm = result["language_model"]
    reference = lm.get("pt_merged", {}).get("bits_per_char")
    parts.append("<h2>Language modelling</h2>")
    if "pt_base_vocab" in lm:
        parts.append(
            "<p>PT, base vocab only: the same pretraining (steps, batch, block size: the same tokens) with the "
            "base tokenizer and no vocabulary extension; beside PT merged it shows what the extension buys.</p>"
        )
    parts.append(
        _table(
            ["model", "bits/char", "vs PT merged", "bits/byte", "token perplexity", "tokens/char", "tokens", "path"],
            [
                [
                    MODEL_LABELS.get(r, r),
                    s["bits_per_char"],
                    f"{s['bits_per_char'] / reference - 1:+.1%}" if reference else "",
                    s["bits_per_byte"],
                    s["token_perplexity"],
                    s["tokens_per_char"],
                    s["tokens"],
                    result["models"][r],
                ]
                for r, s in lm.items()
            ],
        )
    )
    if plot_bits_per_char(lm, plots / "bits_per_char.png"):
        parts.append(_image(plots / "bits_per_char.png", "Bits per character and per byte by model"))
    parts.append("<h2>Training</h2>")
    if plot_loss_curves(logs, plots / "loss_curves.png"):
        parts.append(_image(plots / "loss_curves.png", "Loss curves per stage"))
    losses = [[k, result[k]] for k in ("pt_valid_loss", "sft_valid_loss") if result.get(k) is not None]
    if losses:
        parts.append(_table(["validation", "loss (nats/token)"], losses))
    task = result.get("task")
    sft_log = logs.get("sft", [])
    if plot_accuracy_curve(
        sft_log,
        task["majority_share"] if task else None,
        plots / "accuracy_curve.png",
        task["accuracy_loglik"] if task else None,
    ):
        parts.append(_image(plots / "accuracy_curve.png", "Validation accuracy against SFT steps"))
    if task:
        parts.append("<h2>Task</h2>")
        parts.append(
            _table(
                ["metric", "value"],
                [
                    ["examples", task["examples"]],
                    ["options", " / ".join(task["options"])],
                    ["accuracy (log-likelihood)", task["accuracy_loglik"]],
                    [
                        f"exact match (greedy, first {task.get('greedy_examples_scored', task['examples'])})",
                        task["exact_match"],
                    ],
                    ["test loss (gold answers)", task["test_loss"]],
                    ["predicted share", task["predicted_share"]],
                    ["gold share", task["gold_share"]],
                    ["majority share (baseline)", task["majority_share"]],
                ],
            )
        )
        if plot_task(task, plots / "task.png"):
            parts.append(_image(plots / "task.png", "Task accuracy"))
        parts.append(
            _table(
                ["input", "gold", "greedy answer"],
                [[e["input"], e["gold"], e["greedy"]] for e in task["greedy_examples"]],
            )
        )
    parts.extend(_mcq_section(result.get("mcq")))
    tok = result.get("tokenizer")
    if tok:
        parts.append("<h2>Tokenizer efficiency</h2>")
        parts.append(
            _table(
                ["tokenizer", "vocabulary", "tokens/Chinese char", "tokens/char", "tokens/byte"],
                [
                    [
                        name,
                        tok[name]["vocab_size"],
                        tok[name]["tokens_per_chinese_char"],
                        tok[name]["tokens_per_char"],
                        tok[name]["tokens_per_byte"],
                    ]
                    for name in ("base", "merged")
                ],
            )
        )
        if plot_token_efficiency(tok, plots / "token_efficiency.png"):
            parts.append(_image(plots / "token_efficiency.png", "Tokens per character, base vs merged tokenizer"))
    if result.get("samples"):
        parts.append(
            "<h2>Generation samples</h2><p>The recipe's settings: temperature 0.2, top_k 40, top_p 0.9, "
            "repetition penalty 1.1; the alpaca prompt; the answer after the response marker.</p>"
        )
        parts.append(
            _table(
                ["instruction", "input", "response"],
                [[s["instruction"], s["input"], s["response"]] for s in result["samples"]],
            )
        )
    path = out_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def readme_block(metrics: dict[str, Any], run: dict[str, Any]) -> str:
    """The default run's figures as Markdown, from its evaluation (metrics.json) and its timings."""
    lm = metrics["language_model"]
    reference = lm.get("pt_merged", {}).get("bits_per_char")
    lines = [
        f"Pipeline run `{run['pipeline_run_id']}`: {run['total_seconds'] / 60:.1f} min in the DAG "
        f"({len(run['steps'])} steps).",
        "",
        *(f"- {line}" for line in verdict(metrics)),
    ]
    if run.get("decision"):
        lines.append(f"- Registration: {run['decision']}: {run['reason']}.")
    lines += ["", "| model | held-out bits/char | vs PT merged |", "| --- | --- | --- |"]
    for role in [r for r in MODEL_LABELS if r in lm]:  # the roles' order (metrics.json sorts its keys)
        scores = lm[role]
        change = f"{scores['bits_per_char'] / reference - 1:+.1%}" if reference else ""
        lines.append(f"| {MODEL_LABELS.get(role, role)} | {scores['bits_per_char']:.3f} | {change} |")
    task = metrics.get("task")
    if task:
        lines += [
            "",
            f"Task ({task['examples']} held-out test reviews): accuracy {task['accuracy_loglik']:.3f} by log-likelihood, "
            f"{task['exact_match']:.3f} greedy exact match (first {task.get('greedy_examples_scored', task['examples'])}), "
            f"majority share {task['majority_share']:.3f}; "
            f"predicted {', '.join(f'{k} {v:.2f}' for k, v in task['predicted_share'].items())}.",
        ]
    tok = metrics.get("tokenizer")
    if tok:
        lines.append(
            f"Tokens per Chinese character: {tok['base']['tokens_per_chinese_char']:.3f} (base) -> "
            f"{tok['merged']['tokens_per_chinese_char']:.3f} (merged, {tok['merged_vocab_size']:,} pieces)."
        )
    samples = metrics.get("samples") or []
    if samples:
        lines += ["", "| prompt | answer |", "| --- | --- |"]
        for sample in samples:
            prompt = (sample["instruction"] + (" / " + sample["input"] if sample["input"] else "")).replace("|", "\\|")
            answer = " ".join(sample["response"].split()).replace("|", "\\|")[:80]
            lines.append(f"| {prompt} | {answer} |")
    return "\n".join(lines)

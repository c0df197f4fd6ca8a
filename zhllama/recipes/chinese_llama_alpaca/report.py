"""The evaluation report: one self-contained HTML page (plots inline, so it renders as a Kubeflow
HTML artifact or an MLflow artifact preview) and the plots as PNG files beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"
MODEL_LABELS = {"base": "base", "pt_merged": "PT merged", "final": "final (PT+SFT)"}
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
    majority = max(task["gold_share"].values())
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
    lm = result["language_model"]
    parts.append("<h2>Language modelling</h2>")
    parts.append(
        _table(
            ["model", "bits/char", "bits/byte", "token perplexity", "tokens/char", "tokens", "path"],
            [
                [
                    MODEL_LABELS.get(r, r),
                    s["bits_per_char"],
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
    if task:
        parts.append("<h2>Task</h2>")
        parts.append(
            _table(
                ["metric", "value"],
                [
                    ["examples", task["examples"]],
                    ["options", " / ".join(task["options"])],
                    ["accuracy (log-likelihood)", task["accuracy_loglik"]],
                    ["exact match (greedy)", task["exact_match"]],
                    ["test loss (gold answers)", task["test_loss"]],
                    ["predicted share", task["predicted_share"]],
                    ["gold share", task["gold_share"]],
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

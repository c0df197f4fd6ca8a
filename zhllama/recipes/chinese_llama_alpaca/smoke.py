"""Deploy-then-promote: serve a registered challenger from the registry, send it the
evaluation's sample prompts and a few task items, and check every answer.

An answer passes when it arrives within the time limit with status 200, as one non-empty string
decoded from the server's JSON. The server is stopped again whatever happens."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from zhllama.core import model_server
from zhllama.core.config import SmokeConfig
from zhllama.core.io import InputError, read_json
from zhllama.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def smoke_prompts(eval_dir: str | Path, task_items: int) -> list[dict[str, str]]:
    """The evaluation's generation-sample prompts, then its first ``task_items`` task items."""
    path = Path(eval_dir) / "metrics.json"
    result = read_json(path)
    prompts = [{"instruction": s["instruction"], "input": s.get("input", "")} for s in result.get("samples", [])]
    examples = (result.get("task") or {}).get("greedy_examples", [])
    prompts += [{"instruction": e["instruction"], "input": e["input"]} for e in examples if "instruction" in e][
        :task_items
    ]
    if not prompts:
        raise InputError(f"{path}: no samples or task items to smoke-test with")
    return prompts


def check_answer(answer: model_server.Answer, limit: float) -> str:
    """Why ``answer`` fails the smoke test; empty when it passes."""
    if answer.status != 200:
        return f"status {answer.status}: {str(answer.body)[:300]}"
    if answer.seconds > limit:
        return f"took {answer.seconds:.1f} s (limit {limit:.0f} s)"
    predictions = answer.body.get("predictions") if isinstance(answer.body, dict) else None
    if not isinstance(predictions, list) or len(predictions) != 1 or not isinstance(predictions[0], str):
        return f"not one string answer: {str(answer.body)[:300]}"
    if not predictions[0].strip():
        return "empty answer"
    return ""


def smoke_test(
    model_name: str, version: str, eval_dir: str | Path, cfg: SmokeConfig, settings: Settings | None = None
) -> dict[str, Any]:
    """Start ``models:/model_name/version``'s server (in a private state folder, on a free port),
    send the prompts and return the figures: ``passed``, ``failure``, start seconds, answer
    latencies, and the answers."""
    prompts = smoke_prompts(eval_dir, cfg.task_items)
    params = {"max_new_tokens": cfg.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="zhllama-smoke-") as state:
        settings = dataclasses.replace(settings or get_settings(), state_dir=Path(state))
        started = time.monotonic()
        try:
            served = model_server.start(
                model_name,
                version,
                settings=settings,
                service="smoke",
                timeout=cfg.start_timeout,
                request_timeout=cfg.answer_timeout,
            )
        except model_server.ServeError as err:
            log.error("smoke test of %s version %s: the server did not start: %s", model_name, version, err)
            return {
                "passed": False,
                "failure": f"the server did not start: {str(err)[-1500:]}",
                "start_seconds": round(time.monotonic() - started, 1),
                "prompts": len(prompts),
                "answered": 0,
            }
        try:
            failures, seconds, answers = [], [], []
            for i, prompt in enumerate(prompts):
                try:
                    answer = model_server.invoke(
                        served.url, {"dataframe_records": [prompt], "params": params}, timeout=cfg.answer_timeout
                    )
                except OSError as err:  # refused, reset or timed out: the server failed this prompt
                    failures.append(f"prompt {i}: {type(err).__name__}: {err}")
                    continue
                why = check_answer(answer, cfg.answer_timeout)
                seconds.append(answer.seconds)
                if why:
                    failures.append(f"prompt {i}: {why}")
                else:
                    answers.append({**prompt, "answer": answer.body["predictions"][0]})
                log.info("smoke prompt %d/%d: %.2f s %s", i + 1, len(prompts), answer.seconds, why or "ok")
        finally:
            model_server.stop(settings, "smoke")
    result = {
        "passed": not failures,
        "failure": "; ".join(failures)[:1500],
        "start_seconds": round(served.seconds_to_ready, 1),
        "prompts": len(prompts),
        "answered": len(answers),
        "latency_p50_seconds": round(statistics.median(seconds), 3) if seconds else None,
        "latency_max_seconds": round(max(seconds), 3) if seconds else None,
        "answers": answers,
    }
    log.info(
        "smoke test of %s version %s: %s (%d/%d answered; start %.1f s)",
        model_name,
        version,
        "passed" if result["passed"] else "FAILED: " + result["failure"],
        len(answers),
        len(prompts),
        served.seconds_to_ready,
    )
    return result

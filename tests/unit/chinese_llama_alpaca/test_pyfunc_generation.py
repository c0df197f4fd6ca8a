"""The pyfunc's generation path without a server: batched answers equal single ones (greedy),
and the one generation thread batches waiting requests of equal settings, in order."""

import threading
import time
from pathlib import Path

import pytest

from zhllama.recipes.chinese_llama_alpaca.generation import GenerationSettings, generate, generate_batch
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer
from zhllama.recipes.chinese_llama_alpaca.serving import Batcher

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=6)
PROMPTS = [("中国的首都是哪里？", ""), ("判断情感", "质量很好，非常满意，下次还会再买。"), ("写一句诗。", "")]


def test_a_batched_answer_is_the_single_answer_when_greedy(tiny_final: Path) -> None:
    model, tok = load_model(tiny_final), load_tokenizer(tiny_final)
    single = [generate(model, tok, instruction, text, GREEDY) for instruction, text in PROMPTS]
    assert generate_batch(model, tok, PROMPTS, GREEDY) == single  # left padding is masked
    tok.pad_token = None  # a base model's tokenizer may have no pad token: eos stands in (masked)
    assert tok.pad_token_id is None
    assert generate_batch(model, tok, PROMPTS, GREEDY) == single


def _recording_batcher(max_batch: int):
    calls, gate = [], threading.Event()

    def run(prompts, settings):
        gate.wait(10)
        calls.append((list(prompts), settings))
        return [f"answer to {p[0]}" for p in prompts]

    return Batcher(run, max_batch), calls, gate


def _submit_all(batcher, jobs):
    results = [None] * len(jobs)

    def one(i):
        results[i] = batcher.submit(*jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arrive in this order
    return threads, results


def test_waiting_requests_of_equal_settings_share_one_call_in_order() -> None:
    batcher, calls, gate = _recording_batcher(max_batch=4)
    other = GenerationSettings(max_new_tokens=3)
    jobs = [([("a", "")], GREEDY), ([("b", ""), ("c", "")], GREEDY), ([("d", "")], other), ([("e", "")], GREEDY)]
    threads, results = _submit_all(batcher, jobs)
    gate.set()
    for t in threads:
        t.join(10)
    # a runs alone (nothing waited yet); then b, c and e together; d (other settings) after them
    assert [[p[0] for p in prompts] for prompts, _ in calls] == [["a"], ["b", "c", "e"], ["d"]]
    assert results == [["answer to a"], ["answer to b", "answer to c"], ["answer to d"], ["answer to e"]]


def test_a_request_larger_than_the_batch_is_answered_in_chunks() -> None:
    batcher, calls, gate = _recording_batcher(max_batch=2)
    gate.set()
    assert batcher.submit([(str(i), "") for i in range(5)], GREEDY) == [f"answer to {i}" for i in range(5)]
    assert [len(prompts) for prompts, _ in calls] == [2, 2, 1]


def test_a_failing_batch_fails_its_requests_and_the_thread_goes_on() -> None:
    def run(prompts, settings):
        if prompts[0][0] == "bad":
            raise RuntimeError("out of memory")
        return ["ok"] * len(prompts)

    batcher = Batcher(run, 4)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.submit([("bad", "")], GREEDY)
    assert batcher.submit([("good", "")], GREEDY) == ["ok"]


def test_interactive_generate_answers_each_line_until_an_empty_one(tiny_final: Path) -> None:
    import subprocess
    import sys

    from zhllama.core.settings import PROJECT_ROOT

    out = subprocess.run(
        [sys.executable, "-m", "zhllama.cli", "generate", "--model", str(tiny_final), "--interactive"]
        + ["--max_new_tokens", "4"],
        input="中国的首都是哪里？\n写一句诗。\n\n",
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    answers = [part.split("\n")[0] for part in out.stdout.split("response> ")[1:]]
    assert len(answers) == 2 and all(a.strip() for a in answers), out.stdout  # streamed, then a newline


def test_the_generation_thread_ends_when_idle_and_comes_back() -> None:
    batcher = Batcher(lambda prompts, settings: ["ok"] * len(prompts), 4, idle_seconds=0.2)
    assert batcher.submit([("a", "")], GREEDY) == ["ok"]
    first = batcher.thread
    first.join(5)  # it ends by itself, taking its OpenMP team with it
    assert not first.is_alive() and batcher.thread is None
    assert batcher.submit([("b", "")], GREEDY) == ["ok"]  # a new one starts

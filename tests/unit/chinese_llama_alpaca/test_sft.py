import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from zhllama.core.io import InputError
from zhllama.core.training.loss import IGNORE_INDEX
from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer
from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt
from zhllama.recipes.chinese_llama_alpaca.sft import SftSource, read_alpaca, run_sft, tokenize_example
from zhllama.recipes.chinese_llama_alpaca.vocab import add_pad_token


def test_prompt_template_joins_input_with_newline() -> None:
    prompt = build_prompt("判断情感", "很好用")
    assert prompt.endswith("### Instruction:\n判断情感\n很好用\n\n### Response: ")
    assert build_prompt("你好").count("\n\n### Response: ") == 1


def test_labels_masked_exactly_over_the_prompt(pt_merged: Path) -> None:
    tok = load_tokenizer(pt_merged)
    record = {"instruction": "判断下面这条评论的情感倾向", "input": "质量很好", "output": "正面"}
    ids, labels = tokenize_example(tok, record, 512)
    prompt_ids = tok(build_prompt(record["instruction"], record["input"]))["input_ids"]
    target_ids = tok("正面", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt_ids + target_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    short_ids, short_labels = tokenize_example(tok, record, len(prompt_ids) + 1)
    assert len(short_ids) == len(prompt_ids) + 1 and short_labels[-1] == target_ids[0]


def test_collator_pads_with_pad_and_minus_100(pt_merged: Path) -> None:
    tok = load_tokenizer(pt_merged)
    pad = add_pad_token(tok)
    assert pad not in {tok.eos_token_id, tok.unk_token_id}
    source = SftSource([([1, 5, 6], [IGNORE_INDEX, 5, 6]), ([1, 7], [IGNORE_INDEX, 7])], pad)
    batch = source.collate([0, 1])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, pad]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


BAD_FILES = [
    (
        "malformed-jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        r"bad\.jsonl:2: malformed JSON line",
    ),
    (
        "malformed-json",
        '[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]',
        r"bad\.jsonl:3: malformed JSON",
    ),
    ("missing-output", '{"instruction": "a", "input": "b"}\n', r"bad\.jsonl:1: missing field 'output'"),
    ("non-string", '{"instruction": "a", "output": 5}\n', r"field 'output' must be a string"),
    ("wrong-shape", '{"data": []}', r"expected a JSON list of records or JSONL"),
    ("not-an-object", '["just", "strings"]', r"record 0: expected an object"),
    ("empty", "  \n", r"instruction file is empty"),
]


@pytest.mark.parametrize(("content", "message"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_instruction_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_alpaca(path)


def test_sft_loss_falls_and_pad_is_added(tmp_path: Path, pt_merged: Path, default_data: Path) -> None:
    train = tmp_path / "train.json"
    records = json.loads((default_data / "sft" / "train.json").read_text(encoding="utf-8"))[:400]
    train.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cfg = tiny_config(
        "sft",
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_seq_length=128,
        eval_steps=15,
        max_eval_examples=16,
    )
    metrics = run_sft(pt_merged, train, default_data / "sft" / "valid.json", tmp_path / "sft", cfg)
    history = json.loads((tmp_path / "sft" / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert "eval_loss" in metrics and metrics["padding_share"] < 0.25
    # a closed-answer validation split: every evaluation logs the accuracy (the report's curve)
    assert [h["step"] for h in history if "eval_accuracy" in h] == [15, 30]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    tok = load_tokenizer(tmp_path / "sft" / "tokenizer")
    assert len(tok) == len(load_tokenizer(pt_merged)) + 1 and tok.pad_token == "[PAD]"
    merge_adapters(pt_merged, [tmp_path / "sft"], tmp_path / "final")
    final = load_model(tmp_path / "final")
    assert final.config.vocab_size == len(tok) == len(load_tokenizer(tmp_path / "final"))
    assert final.config.pad_token_id == tok.pad_token_id


def test_length_grouping_cuts_padding(pt_merged: Path, default_data: Path) -> None:
    from zhllama.core.training.loop import batch_order

    tok = load_tokenizer(pt_merged)
    add_pad_token(tok)
    records = read_alpaca(default_data / "sft" / "valid.json")
    source = SftSource([tokenize_example(tok, r, 256) for r in records], tok.pad_token_id)

    def padding(grouped: bool) -> float:
        real = total = 0
        for batch in batch_order(source, 8, 0, 0, grouped):
            lengths = [source.lengths()[i] for i in batch]
            real, total = real + sum(lengths), total + max(lengths) * len(lengths)
        return 1 - real / total

    assert padding(True) < 0.5 * padding(False)


def test_replayed_corpus_rows_join_the_training_examples(pt_merged: Path, default_data: Path, small_corpus) -> None:
    """text_mix_share: that share of rows is corpus text with every token a target, seeded."""
    from zhllama.recipes.chinese_llama_alpaca.sft import training_source

    tok = load_tokenizer(pt_merged)
    add_pad_token(tok)
    train = default_data / "sft" / "valid.json"
    plain, none = training_source(train, [], tok, tiny_config("sft"))
    cfg = tiny_config("sft", text_mix_share=0.2, text_mix_tokens=24)
    mixed, replayed = training_source(train, [small_corpus["train"]], tok, cfg)
    assert none == 0 and replayed == round(len(plain) * 0.25) and len(mixed) == len(plain) + replayed
    for i in range(len(plain), len(mixed)):
        ids, labels = mixed.example(i)
        assert ids[0] == tok.bos_token_id and len(ids) <= 25 and labels == [IGNORE_INDEX, *ids[1:]]
    again, _ = training_source(train, [small_corpus["train"]], tok, cfg)
    assert [again.example(i) for i in range(len(again))] == [mixed.example(i) for i in range(len(mixed))]
    with pytest.raises(InputError, match="needs the corpus text"):
        training_source(train, [], tok, cfg)


def test_batched_cached_examples_equal_record_by_record(tmp_path: Path, pt_merged: Path, default_data: Path) -> None:
    """The streamed, batched, cached path gives tokenize_example's ids and labels, example by
    example (truncation and dropped prompt-only examples included); the cache is keyed by content."""
    from zhllama.recipes.chinese_llama_alpaca import sft

    tok = load_tokenizer(pt_merged)
    add_pad_token(tok)
    records = read_alpaca(default_data / "sft" / "valid.json")[:300]
    records[7] = {**records[7], "input": "很长的输入" * 40}  # truncated at max_seq_length
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    want = [tokenize_example(tok, r, 128) for r in records]
    want = [e for e in want if any(v != IGNORE_INDEX for v in e[1])]
    store, info = sft.tokenized_examples(path, tok, 128, tmp_path / "cache")
    assert info["cache"] == "miss" and [store[i] for i in range(len(store))] == want
    assert store.ids.dtype == np.uint16 and list(store.lengths()) == [len(ids) for ids, _ in want]
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes(path.read_bytes())
    again, info = sft.tokenized_examples(copy, tok, 128, tmp_path / "cache")
    assert info["cache"] == "hit" and [again[i] for i in range(len(again))] == want
    assert sft.tokenized_examples(copy, tok, 100, tmp_path / "cache")[1]["cache"] == "miss"
    ids_file = next((tmp_path / "cache" / "sft").glob(f"{info['cache_key']}.ids"))
    ids_file.write_bytes(ids_file.read_bytes()[:-10])  # truncated: rebuilt, never read
    rebuilt, info = sft.tokenized_examples(copy, tok, 128, tmp_path / "cache")
    assert info["cache"] == "miss" and [rebuilt[i] for i in range(len(rebuilt))] == want


def test_json_lists_stream_record_by_record(tmp_path: Path, monkeypatch) -> None:
    from zhllama.recipes.chinese_llama_alpaca import sft

    records = [{"instruction": f"指令{i}", "input": "中文" * (i % 5), "output": "好"} for i in range(2000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    monkeypatch.setattr(sft, "READ_BYTES", 777)  # records and characters cut across reads
    assert read_alpaca(path) == records
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records[:50], indent=2)[:-40] + "}, oops]", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.json:\d+: malformed JSON"):
        read_alpaca(broken)


PEAK = """
import sys
from zhllama.recipes.chinese_llama_alpaca.sft import iter_alpaca
n = sum(1 for _ in iter_alpaca(sys.argv[1]))
with open("/proc/self/status") as status:
    print(n, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024)
"""


def test_reading_a_large_instruction_file_keeps_memory_flat(tmp_path: Path) -> None:
    import subprocess
    import sys

    record = {"instruction": "判断下面这条评论的情感倾向。", "input": "质量很好，非常满意。" * 8, "output": "正面"}
    peaks = {}
    for count in (2_000, 200_000):  # ~0.5 MB and ~50 MB of JSON
        path = tmp_path / f"n{count}.json"
        path.write_text(json.dumps([record] * count, ensure_ascii=False), encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True)
        n, peaks[count] = (int(v) for v in done.stdout.split())
        assert n == count
    assert peaks[200_000] < peaks[2_000] + 16, f"peak RSS grew with the file: {peaks} MB"


def test_replay_rows_come_from_an_index_not_the_corpus_in_memory(pt_merged: Path, small_corpus) -> None:
    """text_rows reads lines by offset in a seeded order: the rows equal shuffling every line in
    memory (what it did before), across two files and with blank lines skipped."""
    import random

    from zhllama.recipes.chinese_llama_alpaca.corpus import line_index, read_corpus
    from zhllama.recipes.chinese_llama_alpaca.sft import text_rows

    tok = load_tokenizer(pt_merged)
    files = [small_corpus["train"], small_corpus["valid"]]
    lines = read_corpus(files)
    paths, which, offsets = line_index(files)
    assert len(offsets) == len(lines) and which.itemsize == 2 and offsets.itemsize == 8
    random.Random(7).shuffle(lines)
    want = []
    for line in lines:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        for k in range(0, len(ids) - 12, 24):
            row = [tok.bos_token_id, *ids[k : k + 24]]
            want.append((row, [IGNORE_INDEX, *row[1:]]))
        if len(want) >= 50:
            break
    rows = text_rows(files, tok, 50, 24, 7)
    assert [rows[i] for i in range(len(rows))] == want[:50]

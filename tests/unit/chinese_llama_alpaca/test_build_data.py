import json
from pathlib import Path

from zhllama.core.io import sha256_file
from zhllama.recipes.chinese_llama_alpaca.build_data import LABELS, build_default_data, strip_pos_tags


def test_strip_pos_tags() -> None:
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w") == "迈向充满希望的新世纪——"
    assert strip_pos_tags("[中国/ns  共产党/nt]nt  成立/v") == "中国共产党成立"


def test_build_is_byte_identical(tmp_path: Path, default_data: Path) -> None:
    again = tmp_path / "again"
    build_default_data(again)
    first = sorted(p.relative_to(default_data) for p in default_data.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert sha256_file(default_data / rel) == sha256_file(again / rel), rel


def test_splits_are_disjoint_and_shaped(default_data: Path) -> None:
    corpus = {
        s: set((default_data / "corpus" / f"{s}.txt").read_text(encoding="utf-8").splitlines())
        for s in ("train", "valid", "test")
    }
    assert corpus["train"].isdisjoint(corpus["test"]) and corpus["train"].isdisjoint(corpus["valid"])
    assert all(len(v) > 100 for v in corpus.values())
    assert not any("/" in line.split("，")[0][-3:] and line.count("/n") > 2 for line in corpus["valid"]), (
        "POS tags left in"
    )
    sft = {
        s: json.loads((default_data / "sft" / f"{s}.json").read_text(encoding="utf-8"))
        for s in ("train", "valid", "test")
    }
    for split, records in sft.items():
        assert records, split
        for record in records:
            assert set(record) == {"instruction", "input", "output"}
            assert record["output"] in LABELS.values()
        positives = sum(r["output"] == LABELS["pos"] for r in records)
        assert positives * 2 == len(records), f"{split} is not balanced"
    train_inputs = {r["input"] for r in sft["train"]}
    assert train_inputs.isdisjoint(r["input"] for r in sft["test"]), "test reviews leak into training"
    assert train_inputs.isdisjoint(r["input"] for r in sft["valid"])

"""Extend a byte-level BPE vocabulary (GPT-2 / Llama-3 / SmolLM style) by continuing BPE
training on the Chinese corpus from the base's own merges.

What stays true (each checked in ``check_extension`` and in the tests):
* every base token keeps its id, every base merge keeps its rank; new merges come after the
  last base merge and new tokens after the last base id;
* every added token is reachable: the BPE model turns the token's own bytes into that token;
* text without non-ASCII bytes (English, code) tokenizes exactly as before, by construction:
  a new merge only ever joins two tokens made wholly of non-ASCII bytes, so it can never fire
  on ASCII text.

How: the corpus is pre-tokenized with the base's own pre-tokenizer and each word segmented by
the base BPE (that is where base training stopped). Each run of wholly non-ASCII base tokens in
a word becomes a training word whose symbols are the base tokens, written one private-use
character per token, and the ``tokenizers`` BPE trainer (Rust) learns merges over those
symbols: continued training, at the trainer's speed. The learned merges are then taken in
order, keeping each whose operands exist and whose result is reachable given the merges kept
before it. (lowres-cve's merge-based extension re-ranks base merges; this never does.)
Anchor: "Teaching Old Tokenizers New Words" (continued BPE training; new embedding rows as the
mean of their constituents' rows, done in modeling.resize_embeddings).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.corpus import iter_corpus_lines

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
# A fixed English and code sample: tokenizing it must give the base's ids exactly.
ENGLISH_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces; "
    "a model reads their ids.\n"
    "def merge(a: list[int], b: list[int]) -> list[int]:\n    return sorted(a + b)  # O(n log n)\n"
    'SELECT name, COUNT(*) FROM users WHERE created_at > "2024-01-01" GROUP BY name;\n'
    "https://example.com/path?query=1&lang=en  --  12,345.67 USD, 3.14159, 0x7fff"
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): each byte as one printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


@lru_cache(maxsize=1)
def _ascii_symbols() -> frozenset[str]:
    mapping = _bytes_to_unicode()
    return frozenset(mapping[b] for b in range(128))


def is_non_ascii(token: str) -> bool:
    """True when a byte-level token holds no ASCII byte."""
    ascii_symbols = _ascii_symbols()
    return bool(token) and not any(c in ascii_symbols for c in token)


def token_bytes(token: str) -> bytes:
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    return bytes(inverse[c] for c in token)


def read_tokenizer_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_JSON
    if not path.is_file():
        raise InputError(f"{path}: base tokenizer not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a Hugging Face tokenizer.json: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{path}: not a Hugging Face tokenizer.json (no 'model')")
    return data


def _has_byte_level(component: dict[str, Any] | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(c) for c in component.get("pretokenizers", []) or [])


def is_byte_level_bpe(data: dict[str, Any]) -> bool:
    return data["model"].get("type") == "BPE" and _has_byte_level(data.get("pre_tokenizer"))


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def _symbol(index: int) -> str:
    """One private-use character per base token id (planes 15 and 16: 131,068 of them)."""
    if index < 65534:
        return chr(0xF0000 + index)
    if index < 131068:
        return chr(0x100000 + index - 65534)
    raise InputError(f"vocabulary too large to extend ({index} tokens)")


def training_words(base_tokenizer, files: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """The corpus as runs of wholly non-ASCII base tokens, one private-use symbol per token."""
    backend = base_tokenizer.backend_tokenizer
    pre, model = backend.pre_tokenizer, backend.model
    cache: dict[str, list[str]] = {}
    for path in files:
        for line in iter_corpus_lines(path):
            normalised = backend.normalizer.normalize_str(line) if backend.normalizer else line
            for word, _ in pre.pre_tokenize_str(normalised):
                runs = cache.get(word)
                if runs is None:
                    runs, current = [], []
                    for token in model.tokenize(word):
                        if is_non_ascii(token.value):
                            current.append(_symbol(token.id))
                        elif current:
                            runs.append("".join(current))
                            current = []
                    if current:
                        runs.append("".join(current))
                    runs = [r for r in runs if len(r) > 1]
                    if len(cache) < 2_000_000:
                        cache[word] = runs
                yield from runs


def bpe_encode(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE as the tokenizers library applies it: merge the lowest-ranked adjacent
    pair until none is left."""
    parts = list(symbols)
    while len(parts) > 1:
        best, where = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get((parts[i], parts[i + 1]))
            if rank is not None and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            break
        merged = parts[where] + parts[where + 1]
        # apply this merge at every non-overlapping occurrence, left to right (as the library does)
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) in ranks and ranks[(parts[i], parts[i + 1])] == best:
                out.append(merged)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def learn_merges(
    words: Iterable[str], max_merges: int, min_frequency: int, alphabet: Iterable[str]
) -> list[tuple[str, str]]:
    """Continued BPE training over base-token symbols with the tokenizers trainer."""
    from tokenizers import Tokenizer, models, trainers

    alphabet = sorted(set(alphabet))
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + max_merges,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet) + 1,
        special_tokens=[],
    )
    learner = Tokenizer(models.BPE())
    learner.train_from_iterator(words, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    return [_merge_pair(m) for m in learned]


def extend_byte_level_bpe(
    base_tokenizer, files: Sequence[str | os.PathLike[str]], new_tokens: int, min_frequency: int = 2
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base's tokenizer.json with up to ``new_tokens`` new tokens and their merges
    appended; returns (tokenizer json, info)."""
    data = json.loads(base_tokenizer.backend_tokenizer.to_str())
    if not is_byte_level_bpe(data):
        raise InputError("the base tokenizer is not a byte-level BPE (no ByteLevel pre-tokenizer / BPE model)")
    if data["model"].get("ignore_merges"):
        log.warning("the base tokenizer sets ignore_merges: whole-word vocabulary hits bypass merges")
    vocab: dict[str, int] = data["model"]["vocab"]
    base_merges = [_merge_pair(m) for m in data["model"]["merges"]]
    id_to_token = {i: t for t, i in vocab.items()}
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1

    words = list(training_words(base_tokenizer, files))
    if not words:
        raise InputError(f"{', '.join(map(str, files))}: no non-ASCII text to learn new tokens from")
    alphabet = {c for w in words for c in w}
    log.info("continued BPE training: %d words over %d base tokens", len(words), len(alphabet))
    learned = learn_merges(words, int(new_tokens * 1.5) + 64, min_frequency, alphabet)

    def decode(symbols: str) -> str:
        return "".join(
            id_to_token[ord(c) - 0xF0000 if ord(c) < 0x100000 else ord(c) - 0x100000 + 65534] for c in symbols
        )

    ranks = {pair: rank for rank, pair in enumerate(base_merges)}
    known = set(vocab)
    kept_merges: list[tuple[str, str]] = []
    added: list[str] = []
    skipped = {"operand_missing": 0, "unreachable": 0, "known_pair": 0}
    for left_symbols, right_symbols in learned:
        if len(added) >= new_tokens:
            break
        left, right = decode(left_symbols), decode(right_symbols)
        if left not in known or right not in known:
            skipped["operand_missing"] += 1
            continue
        if (left, right) in ranks:
            skipped["known_pair"] += 1
            continue
        rank = len(base_merges) + len(kept_merges)
        ranks[(left, right)] = rank
        if bpe_encode(list(left + right), ranks) != [left + right]:
            del ranks[(left, right)]
            skipped["unreachable"] += 1
            continue
        kept_merges.append((left, right))
        token = left + right
        if token not in known:
            vocab[token] = next_id
            next_id += 1
            known.add(token)
            added.append(token)
    as_strings = isinstance(data["model"]["merges"][0], str) if data["model"]["merges"] else False
    data["model"]["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in kept_merges]
    info = {
        "learned_merges": len(learned),
        "new_merges": len(kept_merges),
        "tokens_added": len(added),
        "merges_skipped": skipped,
        "base_merges": len(base_merges),
    }
    log.info(
        "BPE extension: +%d merges, +%d tokens (learned %d; skipped %s)",
        len(kept_merges),
        len(added),
        len(learned),
        skipped,
    )
    return data, info


def check_extension(base_tokenizer, extended_tokenizer, texts: Sequence[str] = ()) -> dict[str, Any]:
    """What must stay true of an extension, measured: base ids and merge order kept, every
    new token reachable (by its bytes; and by its text where it is whole UTF-8), the English
    sample tokenized as before."""
    base = json.loads(base_tokenizer.backend_tokenizer.to_str())
    new = json.loads(extended_tokenizer.backend_tokenizer.to_str())
    base_vocab, new_vocab = base["model"]["vocab"], new["model"]["vocab"]
    ids_kept = all(new_vocab.get(t) == i for t, i in base_vocab.items())
    base_merges = [_merge_pair(m) for m in base["model"]["merges"]]
    new_merges = [_merge_pair(m) for m in new["model"]["merges"]]
    merges_kept = new_merges[: len(base_merges)] == base_merges
    added = sorted((i, t) for t, i in new_vocab.items() if t not in base_vocab)
    model = extended_tokenizer.backend_tokenizer.model
    by_bytes = sum([tok.id for tok in model.tokenize(t)] == [i] for i, t in added)
    whole = [(i, t) for i, t in added if _is_utf8(t)]
    by_text = sum(
        extended_tokenizer.encode(token_bytes(t).decode("utf-8"), add_special_tokens=False) == [i] for i, t in whole
    )
    sample = [ENGLISH_SAMPLE, *[t for t in texts if t.isascii()][:200]]
    english_same = all(
        base_tokenizer.encode(s, add_special_tokens=False) == extended_tokenizer.encode(s, add_special_tokens=False)
        for s in sample
    )
    return {
        "base_ids_kept": ids_kept,
        "base_merges_kept": merges_kept,
        "new_ids_after_base": all(i >= len(base_vocab) for i, _ in added),
        "added_reachable_by_bytes": by_bytes / max(len(added), 1),
        "added_reachable_by_text": by_text / max(len(whole), 1),
        "added_whole_utf8": len(whole),
        "english_sample_unchanged": english_same,
    }


def _is_utf8(token: str) -> bool:
    try:
        token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

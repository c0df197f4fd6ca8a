"""Where the task lives in a model's representation: a linear probe (logistic regression on
mean-pooled hidden states of training reviews, scored on held-out ones) at the embeddings, the
middle layer and the last layer. It separates "the model cannot read the reviews" from "SFT
did not teach the answer": a probe near chance means no SFT setting has much to read.

    python -m benchmarks.probe --model runs/base --tokenizer runs/vocab/tokenizer \
        --sft data/sft --out runs/probe/base.json [--init_from runs/base_original]

``--init_from`` resizes a base to the (larger) tokenizer first, with the pipeline's own
mean-of-constituents init, so the probe reads the extended model before any training.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhllama.core.io import write_json

log = logging.getLogger("zhllama.probe")


def pooled_states(model, tokenizer, texts: list[str], layers: list[int], max_tokens: int) -> np.ndarray:
    """[len(texts), len(layers), hidden]: each text's hidden states at ``layers``, averaged over
    its tokens (one text at a time: no padding to mask)."""
    out = []
    model.eval()
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] or [tokenizer.eos_token_id]
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(torch.stack([states[i][0].mean(dim=0) for i in layers]).float().numpy())
    return np.stack(out)


def probe(
    model_dir: Path,
    tokenizer_dir: Path,
    sft_dir: Path,
    train_n: int,
    test_n: int,
    max_tokens: int,
    init_from: Path | None = None,
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from zhllama.recipes.chinese_llama_alpaca import modeling

    torch.manual_seed(0)
    model = modeling.load_model(model_dir)
    tokenizer = modeling.load_tokenizer(tokenizer_dir)
    if init_from is not None:
        modeling.resize_embeddings(model, tokenizer, modeling.load_tokenizer(init_from), init="mean_of_pieces")
    train = json.loads((sft_dir / "train.json").read_text(encoding="utf-8"))[:train_n]
    test = json.loads((sft_dir / "test.json").read_text(encoding="utf-8"))[:test_n]
    labels = sorted({r["output"] for r in train})
    n_layers = model.config.num_hidden_layers
    layers = [0, n_layers // 2, n_layers]
    started = time.perf_counter()
    x_train = pooled_states(model, tokenizer, [r["input"] for r in train], layers, max_tokens)
    x_test = pooled_states(model, tokenizer, [r["input"] for r in test], layers, max_tokens)
    y_train = np.array([labels.index(r["output"]) for r in train])
    y_test = np.array([labels.index(r["output"]) for r in test])
    result: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(tokenizer_dir),
        "vocab": len(tokenizer),
        "train": len(train),
        "test": len(test),
        "majority_share": float(max(np.mean(y_test), 1 - np.mean(y_test))),
        "tokens_per_char": float(
            sum(len(tokenizer(r["input"], add_special_tokens=False)["input_ids"]) for r in test)
            / sum(len(r["input"]) for r in test)
        ),
        "encode_seconds": time.perf_counter() - started,
        "layers": {},
    }
    for k, layer in enumerate(layers):
        scaler = StandardScaler().fit(x_train[:, k])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x_train[:, k]), y_train)
        acc = float(clf.score(scaler.transform(x_test[:, k]), y_test))
        result["layers"][str(layer)] = acc
        log.info("layer %d: held-out probe accuracy %.3f", layer, acc)
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--sft", type=Path, default=Path("data/sft"))
    p.add_argument("--init_from", type=Path, default=None, help="base tokenizer dir: resize with mean-of-pieces first")
    p.add_argument("--train_n", type=int, default=1200)
    p.add_argument("--test_n", type=int, default=400)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = probe(args.model, args.tokenizer, args.sft, args.train_n, args.test_n, args.max_tokens, args.init_from)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

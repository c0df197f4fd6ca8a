"""What a PT step's arithmetic allows on this machine: fp32 GEMM throughput at the model's own
shapes, the matmul FLOPs a LoRA PT step with the output layer trained needs per token, and so
the tokens/s a step would reach if it were nothing but matmuls at that rate. Each measured run
then reads as a share of that limit, and the limit over the recipe's tokens/s is the largest
speed-up any fp32 implementation of the same arithmetic can show here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _dims(config: Mapping[str, Any]) -> tuple[int, int, int, int]:
    d, ff = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (config.get("head_dim") or d // heads)
    return d, ff, kv, config["num_hidden_layers"]


def matmul_limit(config: Mapping[str, Any], vocab: int, tokens: int, repeats: int = 5) -> dict[str, Any]:
    """fp32 GEMM throughput at the shapes a LoRA PT step multiplies, weighted as the step weighs
    them: each layer projection's forward and input-gradient products for ``tokens`` rows, and
    the output layer's three (forward, input gradient, weight gradient) in the loss's row chunks
    (``CHUNK_ROWS``) into reused outputs, as ``CausalLMLoss`` runs them; and a square 2048 GEMM,
    the machine's own best case."""
    from zhllama.core.training.loss import CHUNK_ROWS

    d, ff, kv, layers = _dims(config)
    chunk = min(CHUNK_ROWS, tokens)
    # (what, [(m, k, n), ...] products, times a step, outputs reused) with a weight-free LoRA layer's two products
    layer_products = {"q/o": (d, d, 2), "k/v": (d, kv, 2), "gate/up": (d, ff, 2), "down": (ff, d, 1)}
    plans = [
        (name, [(tokens, k, n), (tokens, n, k)], count * layers, False)
        for name, (k, n, count) in layer_products.items()
    ]
    # the loss writes its logits and the weight gradient into buffers it reuses (out=, addmm_): a
    # fresh [vocab, hidden] or [rows, vocab] output a product would add page faults it never pays
    plans.append(("lm_head", [(chunk, d, vocab), (chunk, vocab, d), (vocab, chunk, d)], tokens / chunk, True))
    rows, flops, seconds = [], 0.0, 0.0
    for name, products, times, reused in plans:
        pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in products]
        outs = [torch.empty(m, n) if reused else None for m, _, n in products]

        def step(pairs=pairs, outs=outs) -> None:
            for (a, b), out in zip(pairs, outs, strict=True):
                if out is None:
                    torch.mm(a, b)
                else:
                    torch.mm(a, b, out=out)

        step()
        best = min(_timed(step) for _ in range(repeats))
        f = sum(2 * m * k * n for m, k, n in products)
        shapes = " + ".join(f"{m}x{k}@{k}x{n}" for m, k, n in products)
        rows.append({"shape": shapes, "what": name, "gflops": f / best / 1e9})
        flops += f * times
        seconds += best * times
    square = torch.randn(2048, 2048)
    torch.mm(square, square)
    best = min(_timed(lambda: torch.mm(square, square)) for _ in range(repeats))
    return {
        "tokens": tokens,
        "chunk_rows": chunk,
        "shapes": rows,
        "weighted_gflops": flops / seconds / 1e9,
        "square_2048_gflops": 2 * 2048**3 / best / 1e9,
    }


def train_flops_per_token(config: Mapping[str, Any], vocab: int, block: int) -> float:
    """Matmul FLOPs per token of a LoRA PT step with the output layer trained: forward
    2(N + Vd), input gradients through every layer 2(N + Vd), the output layer's weight
    gradient 2Vd (LoRA's own are negligible, the frozen weights get none); attention's
    score and value products (forward and two backward) at the block length, kept whole
    (not halved for the causal mask). The recipe's gradient checkpointing recomputes the
    layers' forward on top: counted for neither, so both read against the same useful work."""
    d, ff, kv, layers = _dims(config)
    n = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    vd = vocab * d
    attention = layers * 2 * 2 * block * d
    return 2 * (n + vd) + 2 * (n + vd) + 2 * vd + 3 * attention


def roofline(
    config: Mapping[str, Any], vocab: int, block: int, batch: int, tokens_per_second: Mapping[str, float]
) -> dict[str, Any]:
    """Each run's tokens/s as GFLOP/s and as a share of the matmul limit; the limit's own tokens/s
    and its ratio to the recipe's (when a ``recipe`` run is given)."""
    limit = matmul_limit(config, vocab, block * batch)
    per_token = train_flops_per_token(config, vocab, block)
    ceiling = limit["weighted_gflops"] * 1e9 / per_token
    runs = {
        name: {"gflops": tps * per_token / 1e9, "share": tps * per_token / 1e9 / limit["weighted_gflops"]}
        for name, tps in tokens_per_second.items()
    }
    out: dict[str, Any] = {
        "matmul": limit,
        "gflop_per_token": per_token / 1e9,
        "ceiling_tokens_per_second": ceiling,
        "runs": runs,
    }
    if tokens_per_second.get("recipe"):
        out["ceiling_over_recipe"] = ceiling / tokens_per_second["recipe"]
    return out


def render_roofline(r: Mapping[str, Any]) -> str:
    m = r["matmul"]
    text = (
        f"fp32 matmul here at the model's shapes ({m['tokens']} rows): "
        + ", ".join(f"{s['what']} {s['gflops']:.0f}" for s in m["shapes"])
        + f" GFLOP/s (the output layer's three products in chunks of {m.get('chunk_rows', m['tokens'])} rows); "
        f"weighted as a step weighs them **{m['weighted_gflops']:.0f} GFLOP/s** (a square 2048 GEMM: "
        f"{m['square_2048_gflops']:.0f}). A PT step needs {r['gflop_per_token']:.3f} GFLOP of matmuls a token, so a "
        f"step that did nothing else would run **{r['ceiling_tokens_per_second']:,.0f} tokens/s**"
    )
    if "ceiling_over_recipe" in r:
        text += f" = **{r['ceiling_over_recipe']:.2f}x the recipe**, the most fp32 code doing this arithmetic shows at these GEMM rates"
    shares = ", ".join(f"{name} {v['gflops']:.1f} GFLOP/s ({100 * v['share']:.0f}%)" for name, v in r["runs"].items())
    return text + f". Measured, as a share of that limit: {shares}.\n"

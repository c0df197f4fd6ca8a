"""Peak RSS of the default and low-memory merge modes on a model of a few hundred MB.

Builds a random LLaMA (hidden 1024, 8 layers, 32,000 -> merged vocab; ~700 MB fp32, in
~100 MB shards), a LoRA adapter with full embed_tokens/lm_head for the merged vocabulary,
then merges it in a fresh process per mode and reads that process's peak RSS.

    .venv/bin/python benchmarks/merge_memory.py [--workdir /tmp/zhllama-merge-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, time
from zhllama.recipes.chinese_llama_alpaca.merge import merge_adapters
t = time.perf_counter()
merge_adapters(sys.argv[1], [sys.argv[2]], sys.argv[3], low_memory=sys.argv[4] == "1")
# VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork/exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(time.perf_counter() - t, hwm)
"""


def build(workdir: Path) -> tuple[Path, Path]:
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zhllama.recipes.chinese_llama_alpaca.configs import TrainArgs
    from zhllama.recipes.chinese_llama_alpaca.pretrain import lora_config
    from zhllama.recipes.chinese_llama_alpaca.vocab import resolve_base_tokenizer, write_hf_tokenizer

    base, adapter = workdir / "base", workdir / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=8,
            num_attention_heads=8,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(str(base), max_shard_size="100MB")
    write_hf_tokenizer(resolve_base_tokenizer(), base)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_tokens([f"新词{i}" for i in range(17953)])  # the recipe's merged size: 49,953
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = get_peft_model(model, lora_config(TrainArgs()))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    peft_model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/zhllama-merge-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    base, adapter = build(workdir)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter_size = (adapter / "adapter_model.safetensors").stat().st_size
    rows = []
    for mode, flag in (("default", "0"), ("low_memory", "1")):
        out = workdir / f"merged-{mode}"
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(base), str(adapter), str(out), flag],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, rss_kb = result.stdout.split()[-2:]
        merged_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append(
            {
                "mode": mode,
                "seconds": round(float(seconds), 1),
                "peak_rss_mb": round(int(rss_kb) / 1024),
                "merged_size_mb": round(merged_size / 2**20),
                "rss_over_model": round(int(rss_kb) * 1024 / merged_size, 2),
            }
        )
    print(
        json.dumps(
            {
                "base_mb": round(size / 2**20),
                "largest_shard_mb": round(largest / 2**20),
                "adapter_mb": round(adapter_size / 2**20),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""The seed-literal baseline: pretraining and SFT the way the recipe's scripts do them.

``run_clm_pt_with_peft.py`` / ``run_clm_sft_with_peft.py`` with their ``run_pt.sh`` /
``run_sft.sh`` arguments, on CPU in fp32 (or, with ``precision: bf16``, the Trainer's ``--bf16``;
no DeepSpeed, no fp16): Hugging Face ``Trainer`` + peft LoRA (r 8, alpha 32, dropout 0.05, the 7
projections, ``modules_to_save`` embed_tokens and lm_head), ``--gradient_checkpointing``, cosine
schedule with the scripts' warm-up and weight decay, the Trainer's random sampler. PT data goes
through ``datasets`` (``load_dataset("text")``, tokenize, ``group_texts`` into blocks); SFT
examples are prompt + output + eos with the prompt masked, padded to the longest example of each
random batch.

Written from the scripts' documented behaviour for benchmarking only; zhllama never imports it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def _peft(model, lora_rank: int = 8, lora_alpha: float = 32, lora_dropout: float = 0.05):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
        inference_mode=False,
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        modules_to_save=["embed_tokens", "lm_head"],
    )
    return get_peft_model(model, config)


class _Clock:
    """A Trainer callback: wall time of the training loop, first step begin to last step end."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            started: float | None = None
            ended: float | None = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                self.ended = time.perf_counter()

        return Clock()


def _training_args(out_dir: Path, cfg: dict[str, Any], max_steps: int, warmup_ratio: float, weight_decay: float):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        max_steps=max_steps,
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio,  # transformers 5: a float < 1 is the ratio (the scripts' --warmup_ratio)
        weight_decay=weight_decay,
        logging_strategy="steps",
        logging_steps=1,  # the scripts log every 10; every step here, to compare loss curves
        logging_first_step=True,
        save_strategy="no",  # the scripts save every 200 steps: beyond a benchmark's length
        gradient_checkpointing=True,
        bf16=cfg.get("precision") == "bf16",  # the scripts' --bf16: CPU autocast through accelerate
        seed=cfg.get("seed", 42),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def _run(model, args, dataset, collator) -> dict[str, Any]:
    from transformers import Trainer

    clock = _Clock()
    seen: list[tuple[int, int]] = []  # (useful, padded) tokens of each collated batch

    def counting(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        seen.append((int(mask.sum()) if mask is not None else batch["input_ids"].numel(), batch["input_ids"].numel()))
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting, callbacks=[clock])
    trainer.train()
    seconds = clock.ended - clock.started
    trained = seen[: args.max_steps * args.gradient_accumulation_steps]  # the loader collates one batch ahead
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "model": trainer.model,
        "train_seconds": seconds,
        "useful_tokens": sum(u for u, _ in trained),
        "padded_tokens": sum(p for _, p in trained),
        "losses": losses,
    }


def pretrain(
    base_model: str | Path,
    tokenizer_dir: str | Path,
    train_files: Sequence[str | Path],
    out_dir: str | Path,
    cfg: dict[str, Any],
    max_steps: int,
    num_proc: int = 2,
) -> dict[str, Any]:
    """run_clm_pt_with_peft.py: tokenize each line (bos, no eos), concatenate, cut into blocks."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, default_data_collator

    out_dir = Path(out_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    block_size = cfg["block_size"]

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: [t for row in examples[k] for t in row] for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
        result["labels"] = [list(ids) for ids in result["input_ids"]]
        return result

    raw = load_dataset(
        "text", data_files=[str(f) for f in train_files], cache_dir=str(out_dir / "data_cache"), keep_in_memory=False
    )["train"]
    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    grouped.set_format("torch")
    model = LlamaForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model = _peft(model)
    prep_seconds = time.perf_counter() - started
    args = _training_args(out_dir, cfg, max_steps, warmup_ratio=0.05, weight_decay=0.01)
    result = _run(model, args, grouped, default_data_collator)
    return {**result, "prep_seconds": prep_seconds, "blocks": len(grouped)}


def _build_instruction_dataset(
    tokenizer, records: Sequence[dict[str, str]], max_seq_length: int
) -> list[dict[str, torch.Tensor]]:
    """build_dataset.py: source = the alpaca prompt, target = output + eos; labels -100 over the source."""
    from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt

    sources = [build_prompt(r["instruction"], r.get("input") or "") for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
    tokenized_sources = tokenizer(sources, return_attention_mask=False)["input_ids"]
    tokenized_targets = tokenizer(targets, return_attention_mask=False, add_special_tokens=False)["input_ids"]
    examples = []
    for s, t in zip(tokenized_sources, tokenized_targets, strict=True):
        ids = torch.LongTensor(s + t)[:max_seq_length]
        labels = torch.LongTensor([IGNORE_INDEX] * len(s) + t)[:max_seq_length]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def _supervised_collator(pad_id: int):
    """DataCollatorForSupervisedDataset: pad to the longest in the batch; mask = ids != pad."""

    def collate(instances):
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [i["input_ids"] for i in instances], batch_first=True, padding_value=pad_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [i["labels"] for i in instances], batch_first=True, padding_value=IGNORE_INDEX
        )
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id)}

    return collate


def sft(
    model_dir: str | Path, train_file: str | Path, out_dir: str | Path, cfg: dict[str, Any], max_steps: int
) -> dict[str, Any]:
    """run_clm_sft_with_peft.py: add [PAD], resize, LoRA, pad-to-longest random batches."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from zhllama.recipes.chinese_llama_alpaca.sft import read_alpaca

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    dataset = _build_instruction_dataset(tokenizer, read_alpaca(train_file), cfg["max_seq_length"])
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model = _peft(model)
    prep_seconds = time.perf_counter() - started
    args = _training_args(Path(out_dir), cfg, max_steps, warmup_ratio=0.03, weight_decay=0.0)
    result = _run(model, args, dataset, _supervised_collator(tokenizer.pad_token_id))
    return {**result, "prep_seconds": prep_seconds, "pad_token_id": tokenizer.pad_token_id}

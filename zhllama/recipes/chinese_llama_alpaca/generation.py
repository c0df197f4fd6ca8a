"""Generation with the recipe's settings and the alpaca prompt."""

from __future__ import annotations

import dataclasses

import torch

from zhllama.recipes.chinese_llama_alpaca.prompts import build_prompt, extract_response


@dataclasses.dataclass
class GenerationSettings:
    """The recipe's inference settings (scripts/inference/inference_hf.py)."""

    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 64
    do_sample: bool = True
    seed: int = 0


def generate(
    model, tokenizer, instruction: str, input_text: str = "", settings: GenerationSettings | None = None
) -> str:
    settings = settings or GenerationSettings()
    torch.manual_seed(settings.seed)
    prompt = build_prompt(instruction, input_text)
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    return extract_response(text)

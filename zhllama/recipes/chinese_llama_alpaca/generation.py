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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0 or self.repetition_penalty <= 0:
            raise ValueError(
                f"temperature and repetition_penalty must be > 0, got {self.temperature} and {self.repetition_penalty}"
            )
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got {self.top_p} and {self.top_k}")


def _generate_kwargs(tokenizer, settings: GenerationSettings) -> dict:
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def generate(
    model,
    tokenizer,
    instruction: str,
    input_text: str = "",
    settings: GenerationSettings | None = None,
    streamer=None,
) -> str:
    """The answer after the response marker. ``model.generate`` keeps a KV cache, so each new
    token costs one position's forward pass; ``streamer`` (a transformers TextStreamer) gets the
    tokens as they come."""
    settings = settings or GenerationSettings()
    torch.manual_seed(settings.seed)
    prompt = build_prompt(instruction, input_text)
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, **_generate_kwargs(tokenizer, settings), streamer=streamer)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    return extract_response(text)


def generate_batch(model, tokenizer, prompts: list[tuple[str, str]], settings: GenerationSettings) -> list[str]:
    """Answers to several (instruction, input) prompts in one ``model.generate``, left-padded
    (masked, so the pad id does not matter: the pad token, else eos). One prompt takes exactly
    ``generate``'s path. With sampling, the seed is the batch's: an answer's sample depends on the
    prompts beside it."""
    if len(prompts) == 1:
        return [generate(model, tokenizer, *prompts[0], settings)]
    torch.manual_seed(settings.seed)
    ids = [tokenizer(build_prompt(instruction, text))["input_ids"] for instruction, text in prompts]
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # on the left, so every prompt's new tokens follow it directly
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **_generate_kwargs(tokenizer, settings)
        )
    new_tokens = output[:, width:]
    return [extract_response(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

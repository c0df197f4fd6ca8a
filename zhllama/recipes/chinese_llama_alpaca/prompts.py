"""The alpaca prompt of the Chinese-LLaMA-Alpaca recipe, defined once for SFT, evaluation
and serving."""

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
RESPONSE_MARKER = "### Response:"
# The embedded default task (default_data.py), also used by the evaluation samples.
SENTIMENT_INSTRUCTION = "判断下面这条评论的情感倾向，只回答“正面”或“负面”。"


def build_prompt(instruction: str, input_text: str = "") -> str:
    """``input`` is joined to the instruction with a newline, as the recipe does."""
    if input_text:
        instruction = f"{instruction}\n{input_text}"
    return PROMPT_TEMPLATE.format(instruction=instruction)


def extract_response(generated: str) -> str:
    """The answer after the response marker (the whole text when there is none)."""
    return generated.split(RESPONSE_MARKER, 1)[-1].strip()

"""Train the Chinese SentencePiece model and merge it into the base tokenizer (zhllama.steps.vocab)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU
from zhllama.config import VocabConfig

vocab = make_component(
    "vocab",
    "Chinese SentencePiece (BPE) on the corpus, appended to the base model's tokenizer; ids of the base stay put.",
    IMAGE_CPU,
    {"data": "Input[Dataset]", "base_model": "Input[Model]", "tokenizer": "Output[Model]", "metrics": "Output[Metrics]"},
    stage_parameters(VocabConfig),
    "steps.log_kfp_metrics(metrics, steps.vocab(data.path, base_model.path, tokenizer.path, locals()))",
)

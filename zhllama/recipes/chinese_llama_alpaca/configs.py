"""The recipe's stage configurations: one dataclass per stage, every field documented and checked.

The CLI options, the presets and the pipeline parameters are all derived from these dataclasses
(through the stage table, stages.py), so a knob is declared once.
"""

from __future__ import annotations

import dataclasses

from zhllama.core.config import RegisterConfig, SmokeConfig, TrainArgs, doc, positive
from zhllama.recipes.chinese_llama_alpaca.prompts import SENTIMENT_INSTRUCTION

__all__ = [
    "BaseModelConfig",
    "EvalConfig",
    "LoraTrainArgs",
    "MergeConfig",
    "PretrainConfig",
    "RegisterConfig",
    "SmokeConfig",
    "SftConfig",
    "VocabConfig",
]


@dataclasses.dataclass
class VocabConfig:
    """Train a Chinese SentencePiece model and merge it into a base LLaMA tokenizer."""

    vocab_size: int = doc(
        "Pieces in the Chinese SentencePiece model (the recipe's chinese_sp.model: 20000).", default=20000
    )
    model_type: str = doc("SentencePiece model type: bpe (the recipe's) or unigram.", default="bpe")
    character_coverage: float = doc("Share of characters covered by the model (the recipe's 0.9995).", default=0.9995)
    input_sentence_size: int = doc(
        "Sentences sampled from the corpus for training (big corpora); 0 = all.", default=2_000_000
    )
    shuffle_input_sentence: bool = doc("Shuffle before sampling input_sentence_size sentences.", default=True)
    max_sentence_length: int = doc("Bytes; longer lines are skipped by the trainer, not fatal.", default=16384)
    num_threads: int = doc("Trainer threads.", default=2)
    byte_fallback: bool = doc("Byte fallback in the Chinese model (the merged model keeps the base's).", default=False)
    normalization_rule_name: str = doc(
        "Normaliser of the Chinese model; 'identity' matches LLaMA's, so merged pieces match raw text.",
        default="identity",
    )
    split_digits: bool = doc("Split numbers into single digits, as LLaMA does.", default=True)
    new_piece_score: str = doc(
        "Score of appended pieces: 'descending' continues the base's order so the SentencePiece "
        "and Hugging Face fast tokenizers agree; 'zero' is the recipe's literal choice.",
        default="descending",
    )
    seed: int = doc("Seed for sentence sampling.", default=42)
    bpe_new_tokens: int = doc(
        "Byte-level BPE bases (SmolLM2, Llama-3, Qwen): tokens to add by continued BPE training on the corpus "
        "(the SentencePiece options above apply to SentencePiece bases only).",
        default=16000,
    )
    bpe_min_frequency: int = doc("Byte-level BPE bases: a new merge must occur at least this often.", default=2)

    def __post_init__(self) -> None:
        positive(self, "vocab_size", "num_threads", "max_sentence_length", "bpe_new_tokens", "bpe_min_frequency")
        if self.model_type not in {"bpe", "unigram"}:
            raise ValueError(f"VocabConfig.model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"VocabConfig.character_coverage must be in [0.9, 1.0], got {self.character_coverage}")
        if self.input_sentence_size < 0:
            raise ValueError("VocabConfig.input_sentence_size must be >= 0 (0 = all sentences)")
        if self.new_piece_score not in {"descending", "zero"}:
            raise ValueError(
                f"VocabConfig.new_piece_score must be 'descending' or 'zero', got {self.new_piece_score!r}"
            )


@dataclasses.dataclass
class BaseModelConfig:
    """The embedded default base: a small random-init LLaMA, so the pipeline runs offline on 2 cores."""

    hidden_size: int = doc("Hidden size (the target benchmark model: 256).", default=256)
    intermediate_size: int = doc("MLP size.", default=688)
    num_hidden_layers: int = doc("Decoder layers.", default=4)
    num_attention_heads: int = doc("Attention heads.", default=4)
    max_position_embeddings: int = doc("Longest sequence.", default=1024)
    tie_word_embeddings: bool = doc("LLaMA unties them.", default=False)
    seed: int = doc("Init seed.", default=42)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"BaseModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("BaseModelConfig.hidden_size must be a multiple of num_attention_heads")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_MODULES_TO_SAVE = ["embed_tokens", "lm_head"]


@dataclasses.dataclass
class LoraTrainArgs(TrainArgs):
    """The loop's optimisation settings plus LoRA, shared by pretraining and SFT (the recipe's run_*.sh flags)."""

    lora_rank: int = doc("LoRA rank r.", default=8)
    lora_alpha: float = doc("LoRA alpha (scaling alpha/r).", default=32.0)
    lora_dropout: float = doc("LoRA dropout.", default=0.05)
    lora_target_modules: list[str] = doc("Modules that get LoRA adapters.", default_factory=lambda: list(LORA_TARGETS))
    modules_to_save: list[str] = doc(
        "Modules trained in full and saved with the adapter.", default_factory=lambda: list(LORA_MODULES_TO_SAVE)
    )
    modules_to_save_learning_rate: float = doc(
        "Peak learning rate of the modules_to_save (trained in full: tens of millions of weights that every "
        "token's prediction shares); 0 = learning_rate, as the recipe has it.",
        default=0.0,
    )
    tied_embeddings: str = doc(
        "When the base ties embed_tokens and lm_head (SmolLM2, Qwen small models) and both are modules_to_save: "
        "'keep' trains one shared matrix (peft's ensure_weight_tying; the merged model stays tied); 'untie' "
        "trains two copies (the merged model gets its own lm_head: tie_word_embeddings false, one more "
        "vocab x hidden matrix). peft's default would untie in training yet save a config that re-ties.",
        default="keep",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "lora_rank", "lora_alpha")
        if self.tied_embeddings not in {"keep", "untie"}:
            raise ValueError(
                f"{type(self).__name__}.tied_embeddings must be 'keep' or 'untie', got {self.tied_embeddings!r}"
            )
        if self.modules_to_save_learning_rate < 0:
            raise ValueError(f"{type(self).__name__}.modules_to_save_learning_rate must be >= 0 (0 = learning_rate)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{type(self).__name__}.lora_dropout must be in [0, 1)")
        if not self.lora_target_modules:
            raise ValueError(f"{type(self).__name__}.lora_target_modules must name at least one module")

    def learning_rate_for(self, parameter_name: str) -> float:
        """modules_to_save_learning_rate for a fully trained module (peft names its trained copy
        ``<module>.modules_to_save.<adapter>``), learning_rate for the rest."""
        if self.modules_to_save_learning_rate and ".modules_to_save." in parameter_name:
            return self.modules_to_save_learning_rate
        return self.learning_rate


@dataclasses.dataclass
class PretrainConfig(LoraTrainArgs):
    """Continued pretraining on plain Chinese text (run_clm_pt_with_peft.py)."""

    stage: int = doc("1: train only the embeddings (all else frozen); 2: LoRA + full embed_tokens/lm_head.", default=2)
    block_size: int = doc("Tokens per training block (texts are concatenated and cut into blocks).", default=512)
    validation_split_percentage: float = doc("Percent of blocks held out for evaluation.", default=1.0)
    init_new_embeddings: str = doc(
        "New rows: mean_of_pieces (mean of the base pieces the token splits into), mean (mean of all old rows, "
        "what transformers' resize gives) or default (the library's random init).",
        default="mean_of_pieces",
    )
    max_eval_blocks: int = doc("Cap on evaluation blocks (0 = all).", default=64)
    stage1_new_rows_only: bool = doc(
        "Stage 1: train only the rows of the tokens the vocab stage added (a gradient mask; no weight decay on "
        "the embeddings), so every base row stays bit-identical: the embeddings-only stage the recipe describes.",
        default=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"PretrainConfig.stage must be 1 or 2, got {self.stage}")
        positive(self, "block_size")
        if not 0 <= self.validation_split_percentage < 50:
            raise ValueError("PretrainConfig.validation_split_percentage must be in [0, 50)")
        if self.init_new_embeddings not in {"mean_of_pieces", "mean", "default"}:
            raise ValueError("PretrainConfig.init_new_embeddings must be mean_of_pieces, mean or default")


@dataclasses.dataclass
class SftConfig(LoraTrainArgs):
    """Instruction tuning on alpaca-format data (run_clm_sft_with_peft.py)."""

    learning_rate: float = doc("Peak learning rate (recipe SFT: 1e-4).", default=1e-4)
    weight_decay: float = doc("AdamW weight decay (recipe SFT: 0).", default=0.0)
    warmup_ratio: float = doc("Warm-up share (recipe SFT: 0.03).", default=0.03)
    max_seq_length: int = doc("Prompt + response tokens; longer examples are truncated.", default=512)
    group_by_length: bool = doc("Batch examples of similar length, so little compute goes to padding.", default=True)
    max_eval_examples: int = doc("Cap on validation examples per evaluation (0 = all).", default=200)
    text_mix_share: float = doc(
        "Share of training rows that are plain corpus text (LM loss on every token): replay that keeps the "
        "language model while SFT specialises it; 0 = off (the recipe). Needs the corpus (--mix_text).",
        default=0.0,
    )
    text_mix_tokens: int = doc("Tokens per replayed corpus row.", default=64)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "max_seq_length", "text_mix_tokens")
        if not 0 <= self.text_mix_share < 1:
            raise ValueError(f"SftConfig.text_mix_share must be in [0, 1), got {self.text_mix_share}")


@dataclasses.dataclass
class MergeConfig:
    """Merge LoRA adapters into the base weights."""

    low_memory: bool = doc(
        "Merge one safetensors shard at a time (peak ~ largest shard + adapter, not 2x the model).", default=False
    )
    max_shard_size: str = doc("Shard size of the written model.", default="2GB")


SAMPLE_PROMPTS = [
    "请用一句话介绍北京。",
    "中国的首都是哪里？",
    "写一句关于春天的诗。",
    f"{SENTIMENT_INSTRUCTION}\n质量很好，非常满意，下次还会再买。",
    f"{SENTIMENT_INSTRUCTION}\n物流太慢了，包装也破了，很失望。",
]


@dataclasses.dataclass
class EvalConfig:
    """Evaluation: bits per character on held-out text, task metrics, generation samples."""

    lm_max_lines: int = doc("Held-out text lines scored per model (0 = all).", default=200)
    lm_chunk_chars: int = doc(
        "Characters per scored sequence; every model scores exactly the same characters.", default=256
    )
    batch_size: int = doc("Sequences per forward pass.", default=8)
    task_max_examples: int = doc("Instruction test examples scored (0 = all).", default=200)
    task_options: list[str] = doc(
        "Answer options scored by log-likelihood; empty = the distinct outputs of the test file (at most 20).",
        default_factory=list,
    )
    task_max_new_tokens: int = doc("Greedy tokens generated for exact match.", default=8)
    task_greedy_max_examples: int = doc(
        "Of the scored examples, the first this many are also answered greedily for exact match "
        "(0 = all): ranking is a forward pass per option, greedy decoding one per new token.",
        default=0,
    )
    sample_prompts: list[str] = doc(
        "Prompts for the generation samples (instruction, then an optional input after a newline).",
        default_factory=lambda: list(SAMPLE_PROMPTS),
    )
    max_new_tokens: int = doc("Tokens generated per sample (the recipe's settings otherwise).", default=64)
    seed: int = doc("Sampling seed.", default=0)
    num_threads: int = doc("CPU threads for torch; 0 = all cores.", default=0)
    mcq_dir: str = doc(
        "C-Eval/CMMLU-layout folder (dev/ for shots; val/ or test/ scored), a local path or an s3:// URI; "
        "every model is scored by its next-token logits of A-D; empty = skipped.",
        default="",
    )
    mcq_split: str = doc("Split scored: val, test, or auto (val when present, else test).", default="auto")
    mcq_shots: int = doc("Shots from dev/ per prompt (the recipe's 5; 0 = zero-shot).", default=5)
    mcq_max_per_subject: int = doc("Questions scored per subject, to bound the time (0 = all).", default=0)

    def __post_init__(self) -> None:
        positive(self, "lm_chunk_chars", "batch_size", "task_max_new_tokens", "max_new_tokens")
        if self.mcq_split not in {"val", "test", "auto"}:
            raise ValueError(f"EvalConfig.mcq_split must be val, test or auto, got {self.mcq_split!r}")
        for name in (
            "lm_max_lines",
            "task_max_examples",
            "task_greedy_max_examples",
            "num_threads",
            "mcq_shots",
            "mcq_max_per_subject",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")

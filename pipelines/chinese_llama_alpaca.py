"""The Chinese-LLaMA-Alpaca recipe as one Kubeflow pipeline:

    prerequisites -> data -> base -> vocab -> tokenize (one per corpus file, ParallelFor)
                  -> [pretrain stage 1] -> pretrain stage 2 -> merge_pt
                  -> sft -> merge_final -> evaluate -> register (gate) -> serve_smoke (promotion)
                  [base -> tokenize -> pretrain with the base vocabulary -> merge -> evaluate: the ablation]

Wiring only: every step is a component over zhllama, every knob a pipeline parameter: the
signature is pipelines/signature.py, written with the components from the recipe's stage table
(zhllama/recipes/chinese_llama_alpaca/stages.py) by `make components`. Settings that only a cluster has (GPUs,
resources, secrets, the run id from the pod's labels) live here and nowhere else.

Compile: make compile (writes pipelines/chinese_llama_alpaca.yaml, checked in; a test fails when
it is stale). Run here: make run (kfp.local). Submit: zhllama submit --host URL.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from kfp import dsl

from components.base import base_cpu as base
from components.data import data_cpu as data
from components.evaluate import evaluate_cpu as evaluate
from components.images import IMAGE_CPU, IMAGE_CUDA
from components.merge import merge_cpu as merge
from components.prerequisites import prerequisites_cpu as prerequisites
from components.pretrain import pretrain_cpu, pretrain_gpu
from components.register import register_cpu as register
from components.serve_smoke import serve_smoke_cpu as serve_smoke
from components.sft import sft_cpu, sft_gpu
from components.tokenize import tokenize_cpu as tokenize
from components.vocab import vocab_cpu as vocab
from pipelines import signature

PIPELINE_NAME = "zhllama-chinese-llama-alpaca"
DESCRIPTION = "Chinese vocabulary, LoRA pretraining, SFT, merges, evaluation and gated MLflow registration (Chinese-LLaMA-Alpaca)."

# Cluster settings (never read by kfp.local). Secrets hold credentials; the YAML only names them.
S3_SECRET = os.environ.get(
    "ZHLLAMA_S3_SECRET", "zhllama-s3"
)  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
MLFLOW_SECRET = os.environ.get(
    "ZHLLAMA_MLFLOW_SECRET", "zhllama-mlflow"
)  # keys: MLFLOW_TRACKING_URI (+ token/username/password if any)
CPU_STEP = {"cpu": "2", "memory": "8G"}
TRAIN_STEP = {
    "cpu": "8",
    "memory": "64G",
}  # 7B LoRA + full embed/lm_head in bf16: ~40 GB GPU, ~60 GB host for loading and merging
MERGE_STEP = {"cpu": "4", "memory": "48G"}  # default merge peaks ~2.1x the model's size; merge_low_memory ~1.1x
LAUNCH_STEP = {"cpu": "1", "memory": "4G"}  # train_launcher=trainjob: the step only stages data and follows the job
# A preempted or killed training pod: KFP runs the step again, and it resumes from its durable checkpoint.
TRAIN_RETRY = {"num_retries": 3, "backoff_duration": "10s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}


def _cluster_settings(
    task: dsl.PipelineTask, resources: dict[str, str], gpus: int = 0, code_version: str | None = None
) -> dsl.PipelineTask:
    from kfp import kubernetes

    if code_version:  # local runs: the library's code is part of every step's cache key (a cluster has the image tag)
        task.set_env_variable("ZHLLAMA_CODE_VERSION", code_version)
    task.set_cpu_request(resources["cpu"]).set_memory_request(resources["memory"]).set_memory_limit(resources["memory"])
    if gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(str(gpus))
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
        },
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task, secret_name=MLFLOW_SECRET, secret_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}, optional=True
    )
    # One MLflow parent run per pipeline run, without putting the run id into any cache key.
    kubernetes.use_field_path_as_env(
        task, env_name="ZHLLAMA_PIPELINE_RUN_ID", field_path="metadata.labels['pipeline/runid']"
    )
    return task


def build_pipeline(gpus: int = 0, code_version: str | None = None, launcher: str = "in_pod"):
    """The pipeline function; ``gpus`` > 0 gives the CUDA variant (training steps on GPUs);
    ``launcher="trainjob"`` the variant whose training runs in Kubeflow Trainer TrainJobs (the
    steps are light pods that launch them; ``gpus`` then counts per TrainJob node)."""
    pretrain_op, sft_op = (pretrain_gpu, sft_gpu) if gpus else (pretrain_cpu, sft_cpu)
    trainjob = launcher == "trainjob"
    node = ",".join(f"{k}={v}" for k, v in {**TRAIN_STEP, **({"gpu": str(gpus)} if gpus else {})}.items())
    training_image = IMAGE_CUDA if gpus else IMAGE_CPU

    def _cluster(task: dsl.PipelineTask, resources: dict[str, str], gpus: int = 0) -> dsl.PipelineTask:
        return _cluster_settings(task, resources, gpus, code_version)

    def _training_step(task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Retried on failure; in the trainjob variant a light pod (the TrainJob's nodes get the GPUs)."""
        task.set_retry(**TRAIN_RETRY)
        return _cluster(task, LAUNCH_STEP, 0) if trainjob else _cluster(task, TRAIN_STEP, gpus)

    def wire(*args: Any, **kwargs: Any) -> None:
        by_stage = signature.parameters(*args, **kwargs)  # KFP passes the parameters positionally
        p = by_stage["run"]
        track = {"mlflow_tracking_uri": p["mlflow_tracking_uri"], "mlflow_experiment": p["mlflow_experiment"]}
        scale = {
            "nproc_per_node": p["train_nproc_per_node"],
            "nnodes": p["train_nnodes"],
            "train_launcher": p["train_launcher"],
            "checkpoint_uri": p["checkpoint_uri"],
            # the checkpoint key: resolved when the task runs, so no cache key holds a per-run value
            "checkpoint_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "checkpoint_task": dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            "trainjob_image": training_image,
            "trainjob_resources": node,
        }

        check = _cluster(prerequisites(**by_stage["all"]).set_display_name("prerequisites"), CPU_STEP)
        check.set_caching_options(False)  # cheap, and the server may have gone down since
        dataset = _cluster(
            data(data_revision=p["data_revision"], data_repo=p["data_repo"], data_md5=p["data_md5"], **track).after(
                check
            ),
            CPU_STEP,
        )
        base_model = _cluster(
            base(base_model_uri=p["base_model_uri"], **by_stage["base"], **track).after(check), CPU_STEP
        )
        tokenizer = _cluster(
            vocab(
                data=dataset.outputs["dataset"], base_model=base_model.outputs["model"], **by_stage["vocab"], **track
            ),
            CPU_STEP,
        )
        pt = {**by_stage["pretrain"], **track, **scale}

        def tokenized(display: str, vocab_in, vocab_subdir: str):
            """The fan-out: one tokenize step per corpus file (each its own pod and cache entry on a
            cluster), collected into the PT step's list of shards."""
            with dsl.ParallelFor(p["pt_corpus_files"]) as corpus_file:
                task = tokenize(
                    data=dataset.outputs["dataset"],
                    vocab=vocab_in,
                    corpus_file=corpus_file,
                    vocab_subdir=vocab_subdir,
                    **track,
                )
                _cluster(task.set_display_name(display), CPU_STEP)
            return task.outputs["shard"]  # each consumer takes its own dsl.Collected of it (kfp rewrites one in place)

        def pretrained(stage: int, display: str, base_model_in, vocab_in, shards_in, **more: Any) -> dsl.PipelineTask:
            task = pretrain_op(
                base_model=base_model_in, vocab=vocab_in, shards=dsl.Collected(shards_in), stage=stage, **{**pt, **more}
            )
            return _training_step(task.set_display_name(display))

        def merged(display: str, base_model_in, adapter_run, **more: Any) -> dsl.PipelineTask:
            task = merge(
                base_model=base_model_in,
                adapter_run=adapter_run,
                stage_name=display.replace("-", "_"),
                **by_stage["merge"],
                **track,
                **more,
            )
            return _cluster(task.set_display_name(display), MERGE_STEP)

        def after_pretraining(pt_base, pt_base_subdir: str, shards) -> None:
            """Stage 2, merges, SFT, evaluation and registration: the same in both branches."""
            stage2 = pretrained(
                2, "pretrain-stage2", pt_base, tokenizer.outputs["tokenizer"], shards, base_model_subdir=pt_base_subdir
            )
            merged_pt = merged("merge-pt", pt_base, stage2.outputs["run"], base_model_subdir=pt_base_subdir)
            tuned = _training_step(
                sft_op(
                    model=merged_pt.outputs["merged"],
                    data=dataset.outputs["dataset"],
                    **by_stage["sft"],
                    **track,
                    **scale,
                )
            )
            final = merged("merge-final", merged_pt.outputs["merged"], tuned.outputs["run"])

            def evaluate_and_register(**ablation: Any) -> None:
                scored = _cluster(
                    evaluate(
                        data=dataset.outputs["dataset"],
                        base_model=base_model.outputs["model"],
                        pt_merged=merged_pt.outputs["merged"],
                        final=final.outputs["merged"],
                        vocab=tokenizer.outputs["tokenizer"],
                        pt_run=stage2.outputs["run"],
                        sft_run=tuned.outputs["run"],
                        **ablation,
                        **by_stage["evaluate"],
                        **track,
                    ),
                    MERGE_STEP,
                )
                registered = _cluster(
                    register(
                        final=final.outputs["merged"],
                        evaluation=scored.outputs["evaluation"],
                        **by_stage["register"],
                        **track,
                    ),
                    CPU_STEP,
                )
                # Deploy-then-promote: champion moves only once the challenger's own server has answered.
                _cluster(
                    serve_smoke(
                        registration=registered.outputs["registration"],
                        evaluation=scored.outputs["evaluation"],
                        **by_stage["serve_smoke"],
                        **track,
                    ),
                    CPU_STEP,
                )

            with dsl.If(p["pt_base_vocab_ablation"] == True, name="with-base-vocab-ablation"):  # noqa: E712 - a KFP condition
                # Stage 2 from the raw base with its own vocabulary (no merge): the same steps and tokens.
                raw = base_model.outputs["model"]
                ablation = pretrained(
                    2,
                    "pretrain-base-vocab",
                    raw,
                    raw,
                    tokenized("tokenize-base-vocab", raw, ""),
                    vocab_subdir="",
                    stage_name="pretrain_base_vocab",
                )
                evaluate_and_register(
                    pt_base_vocab=merged("merge-base-vocab", raw, ablation.outputs["run"]).outputs["merged"]
                )
            with dsl.Else(name="without-ablation"):
                evaluate_and_register()

        with dsl.If(p["pt_stage1"] == True, name="pt-stage1-then-stage2"):  # noqa: E712 - a KFP condition, not a Python comparison
            shards = tokenized("tokenize", tokenizer.outputs["tokenizer"], "tokenizer")
            stage1 = pretrained(
                1,
                "pretrain-stage1",
                base_model.outputs["model"],
                tokenizer.outputs["tokenizer"],
                shards,
                max_steps=p["pt_stage1_max_steps"],
            )
            after_pretraining(stage1.outputs["run"], "model", shards)
        with dsl.Else(name="pt-stage2-only"):
            # a Collected is consumed in the condition branch that holds its loop (kfp's compiler
            # cannot pass one into another group), so each branch fans out on its own
            after_pretraining(
                base_model.outputs["model"], "", tokenized("tokenize", tokenizer.outputs["tokenizer"], "tokenizer")
            )

    # The signature KFP reads: the generated one's typed parameters, with their defaults.
    params = inspect.signature(signature.parameters)
    if trainjob:
        params = params.replace(
            parameters=[
                q.replace(default="trainjob") if q.name == "train_launcher" else q for q in params.parameters.values()
            ]
        )
    wire.__signature__ = params.replace(return_annotation=inspect.Signature.empty)
    wire.__name__ = wire.__qualname__ = PIPELINE_NAME.replace("-", "_")
    wire.__doc__ = DESCRIPTION
    name = PIPELINE_NAME + ("-gpu" if gpus else "") + ("-trainjob" if trainjob else "")
    return dsl.pipeline(name=name, description=DESCRIPTION)(wire)


chinese_llama_alpaca = build_pipeline()

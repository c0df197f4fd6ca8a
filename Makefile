# zhllama: the two commands a fresh machine needs are `make setup` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
UV          := $(VENV)/bin/uv
BIN         := $(CURDIR)/$(VENV)/bin
# The CPU torch wheel lies here on this machine kind; uv only looks where it is told.
FIND_LINKS  ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
UV_VERSION  ?= 0.13.9
PRESET      ?= configs/default.yaml
RUNS        ?= runs
# S3 credentials, endpoint and MLflow URI, from the one settings place (zhllama/core/settings.py).
SERVICE_ENV  = eval "$$($(PY) -m zhllama.core.settings)"
export PATH := $(BIN):$(PATH)
# Tracking goes to the MLflow server when `make services` runs, else to the local store ./mlruns.
TRACK_ENV    = if $(PY) -m zhllama.core.services status >/dev/null 2>&1; then $(SERVICE_ENV); else echo "(services not running: tracking into ./mlruns; make services for the MLflow server)"; fi
# One MLflow parent run per `make chain`; sub-makes inherit it through the environment.
ifndef ZHLLAMA_PIPELINE_RUN_ID
export ZHLLAMA_PIPELINE_RUN_ID := make-$(shell date +%Y%m%d-%H%M%S)
endif
ZH           = $(TRACK_ENV) && $(PY) -m zhllama.cli


.PHONY: setup-containers engine engine-down images-cuda run-containers test-containers
.PHONY: components lint
.PHONY: help setup lock test test-fast services services-down services-status data data-push data-pull vocab base chain evaluate register compile run images promote generate bench clean serve serve-down deploy

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ## create .venv and install the pinned stack (requirements.lock) and zhllama (editable), bytecode compiled (a cold start compiles thousands of modules otherwise)
	@test -x $(PY) || { python3 -m venv $(VENV) && touch $(VENV)/.bytecode-compiled; }  # uv compiles all it installs
	@test -x $(UV) || $(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip install --python $(PY) --compile-bytecode --find-links $(FIND_LINKS) -r requirements.lock
	$(UV) pip install --python $(PY) --compile-bytecode --no-deps -e .
	@test -f $(VENV)/.bytecode-compiled || { echo "compiling the bytecode of an older .venv (once)"; \
	  $(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true; touch $(VENV)/.bytecode-compiled; }
	@$(PY) -c "import torch, transformers, peft, kfp, mlflow, dvc, sentencepiece; print('ok: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| kfp', kfp.__version__, '| mlflow', mlflow.__version__)"

lock: ## re-resolve requirements.in into requirements.lock (seconds with uv)
	$(UV) pip compile requirements.in --find-links $(FIND_LINKS) --python-version 3.11 -o requirements.lock

lint: ## ruff: the linter and the formatter's check (configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint ## the whole suite: lint, unit, integration (starts the real services itself), reference tests
	$(PY) -m pytest -q || { code=$$?; [ $$code -eq 5 ] && echo "pytest collected no tests" || exit $$code; }

test-fast: ## unit tests only (no services)
	$(PY) -m pytest -q -m "not services and not slow"

services: ## start SeaweedFS (S3) and the MLflow server on 127.0.0.1
	$(PY) -m zhllama.core.services up

services-down: ## stop them, by PID
	$(PY) -m zhllama.core.services down

services-status:
	$(PY) -m zhllama.core.services status

data: ## build the default data (deterministic) and track data/ with DVC (data.dvc)
	$(PY) -m zhllama.cli data --out data
	$(VENV)/bin/dvc add data

data-push: ## push data/ to the DVC remote on the object store (needs `make services`)
	$(SERVICE_ENV) && $(VENV)/bin/dvc push

data-pull: ## fetch data/ at the revision data.dvc names
	$(SERVICE_ENV) && $(VENV)/bin/dvc pull

vocab: ## the vocabulary stage on the default corpus
	$(ZH) vocab --preset $(PRESET) --train data/corpus/train.txt --valid data/corpus/valid.txt --out $(RUNS)/vocab

clean: ## remove run outputs and caches (not the data, not the services' state)
	rm -rf $(RUNS) .pytest_cache .kfp_outputs .kfp_cache

base: ## the small random-init LLaMA base model of the default run
	$(ZH) base --preset $(PRESET) --out $(RUNS)/base

chain: ## the whole recipe by CLI on the default data: base, vocab, PT, merge, SFT, merge, evaluate, register
	$(MAKE) base vocab
	$(ZH) pretrain --preset $(PRESET) --base_model $(RUNS)/base --tokenizer $(RUNS)/vocab/tokenizer --train data/corpus/train.txt --out $(RUNS)/pt
	$(ZH) merge --preset $(PRESET) --stage_name merge_pt --base_model $(RUNS)/base --adapters $(RUNS)/pt --out $(RUNS)/pt_merged
	$(ZH) sft --preset $(PRESET) --model $(RUNS)/pt_merged --train data/sft/train.json --valid data/sft/valid.json --out $(RUNS)/sft
	$(ZH) merge --preset $(PRESET) --stage_name merge_final --base_model $(RUNS)/pt_merged --adapters $(RUNS)/sft --out $(RUNS)/final
	$(MAKE) evaluate register

evaluate: ## evaluate base, PT-merged and final models; writes runs/eval/report.html
	$(ZH) evaluate --preset $(PRESET) --base_model $(RUNS)/base --pt_model $(RUNS)/pt_merged --final_model $(RUNS)/final --vocab $(RUNS)/vocab --pt_run $(RUNS)/pt --sft_run $(RUNS)/sft --out $(RUNS)/eval

register: ## log + register the final model in MLflow; the gate decides whether it becomes champion
	$(ZH) register --preset $(PRESET) --model $(RUNS)/final --eval $(RUNS)/eval

components: ## write components/*.py and pipelines/signature.py from the stage table and config dataclasses (checked in)
	$(PY) -m zhllama.core.codegen

compile: components ## compile the Kubeflow pipeline YAMLs (CPU and GPU), checked in; upload one in the Kubeflow UI
	$(PY) -m zhllama.cli compile
	$(PY) -m zhllama.cli compile --gpus 1
	$(PY) -m zhllama.cli compile --launcher trainjob

run: ## the whole DAG on this machine through kfp.local (services, default data and base); cached steps are reused
	@$(PY) -m zhllama.core.services status >/dev/null 2>&1 || $(MAKE) services
	test -d data || $(MAKE) data
	$(SERVICE_ENV) && $(PY) -m pipelines.local --preset $(PRESET) $(if $(filter configs/default.yaml,$(PRESET)),--readme README.md) $(RUN_ARGS)

bench: ## zhllama vs the seed-literal recipe baseline, and merge, vocab, scale, pipeline figures (~18 min; runs/bench/bench.md; BENCH_ARGS="--pipeline_full" times make run itself)
	@$(PY) -m zhllama.core.services status >/dev/null 2>&1 || $(MAKE) services
	test -d data || $(MAKE) data
	$(SERVICE_ENV) && $(PY) -m benchmarks.bench $(BENCH_ARGS)

setup-containers: ## one-time, as root: Debian's docker.io (engine + CLI), mmdebstrap (a local base where no registry answers), docker-registry (tests)
	@if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null && command -v docker-registry >/dev/null; then \
	  echo "docker.io, mmdebstrap and docker-registry are installed"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io mmdebstrap docker-registry; fi

engine: ## use the running Docker engine, or start the project's own (unix socket in .services/docker, stopped by PID)
	$(PY) -m zhllama.core.containers up

engine-down: ## stop the project's own container engine
	$(PY) -m zhllama.core.containers down

images: ## build the CPU image (tag: the version, and version-codehash); PUSH=1 pushes; starts the engine when none runs
	@$(PY) -m zhllama.core.containers status >/dev/null 2>&1 || $(MAKE) engine
	$(PY) -m components.images build cpu $(if $(PUSH),--push)

images-cuda: ## build the CUDA image (torch's CUDA wheels from PyPI; several GB); PUSH=1 pushes
	@$(PY) -m zhllama.core.containers status >/dev/null 2>&1 || $(MAKE) engine
	$(PY) -m components.images build cuda $(if $(PUSH),--push)

run-containers: images ## the checked-in compiled YAML through kfp.local's DockerRunner: every step in its own container (builds the image first: seconds when only code changed)
	@$(PY) -m zhllama.core.services status >/dev/null 2>&1 || $(MAKE) services
	$(SERVICE_ENV) && $(PY) -m pipelines.local --containers --preset $(PRESET) $(RUN_ARGS)

test-containers: ## only the container tests (make test runs them too): the compiled YAML step by step in the image, as its non-root user
	$(PY) -m pytest -q -m containers

promote: ## move champion by hand: make promote VERSION=3 REASON="..."
	$(ZH) promote --version "$(VERSION)" --reason "$(REASON)"

serve: ## serve a registered version from the registry on 127.0.0.1:15080 (ALIAS=champion, or VERSION=N); needs `make services`; stopped by PID
	@$(SERVICE_ENV) && $(PY) -m zhllama.cli serve $(if $(VERSION),--version "$(VERSION)",--alias "$(or $(ALIAS),champion)")

serve-down: ## stop the server `make serve` started, by PID
	$(PY) -m zhllama.cli serve --stop

deploy: ## print the KServe InferenceService for the version holding ALIAS (default champion); DRY_RUN=0 applies it
	@$(SERVICE_ENV) && $(PY) -m zhllama.cli deploy --alias "$(or $(ALIAS),champion)" $(if $(filter 0,$(DRY_RUN)),,--dry-run)

generate: ## answer one prompt with the final model (INTERACTIVE=1: a prompt loop, answers streamed)
	$(PY) -m zhllama.cli generate --model $(RUNS)/final $(if $(INTERACTIVE),--interactive,--instruction "判断下面这条评论的情感倾向，只回答“正面”或“负面”。" --input "质量很好，非常满意")

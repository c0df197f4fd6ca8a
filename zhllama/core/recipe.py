"""What a recipe declares once, in one table, and what every front end derives from it.

A recipe is a table of stages (name, pipeline parameter prefix, preset section, config
dataclass, the artifacts it takes and makes, the metrics it produces) plus its run-wide
parameters. The CLI, the preset loader, the prerequisites check, the pipeline parameters, the
generated components and the promotion-metric check all read the table, so adding a stage or a
field is one edit. Nothing here imports kfp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhllama.core.config import build_config, config_fields, read_preset
from zhllama.core.io import InputError


@dataclass(frozen=True)
class Metric:
    """A figure a stage produces; ``direction`` says which way is better (for the promotion gate)."""

    name: str
    direction: str = "min"


@dataclass(frozen=True)
class Stage:
    """One row of a recipe's stage table.

    ``inputs``/``outputs`` map a component's artifact argument to its KFP artifact type
    (``Model``, ``Dataset``, ``Artifact``, ``Metrics``, ``HTML``); ``optional_inputs`` are
    artifacts a run may leave out (the DAG passes them in one branch of a condition); ``parameters`` are the
    component's own parameters beyond the config's fields, as (name, type, default, help);
    ``dag_set`` are config fields the DAG sets itself, with the value a preset may repeat
    (never pipeline parameters).
    """

    name: str
    doc: str
    prefix: str = ""
    section: str = ""
    config: type | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    optional_inputs: dict[str, str] = field(default_factory=dict)
    parameters: tuple[tuple[str, type, Any, str], ...] = ()
    dag_set: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[Metric, ...] = ()
    returns: str = "None"
    gpu_variant: bool = False

    def config_parameters(self) -> list[tuple[str, Any, Any]]:
        """(field, type, default) of the config fields that are pipeline parameters."""
        if self.config is None:
            return []
        return [(name, tp, default) for name, tp, default in config_fields(self.config) if name not in self.dag_set]


RUN_SECTION = "run"


@dataclass(frozen=True)
class Recipe:
    """A recipe's stage table, its run-wide pipeline parameters and the tracking parameters every
    component takes (name, type, default, help); the run-wide ones include the tracking ones."""

    name: str
    stages: tuple[Stage, ...]
    run_parameters: tuple[tuple[str, type, Any, str], ...] = ()
    tracking_parameters: tuple[tuple[str, type, Any, str], ...] = ()

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"recipe {self.name} has no stage {name!r}; it has {', '.join(s.name for s in self.stages)}")

    def configured(self) -> list[Stage]:
        """The stages with a config dataclass (a preset section and a parameter prefix each)."""
        return [stage for stage in self.stages if stage.config is not None]

    def sections(self) -> dict[str, Stage]:
        return {stage.section: stage for stage in self.configured()}

    def preset_sections(self) -> list[str]:
        """What a preset may hold: a section per configured stage, and ``run`` for the run-wide
        pipeline parameters (base_model_uri, pt_stage1, ...)."""
        return [*self.sections(), RUN_SECTION]

    def pipeline_parameters(self) -> list[tuple[str, Any, Any]]:
        """(name, type, default) of every pipeline parameter, in UI order: run-wide ones, then
        each stage's config fields under its prefix."""
        params = [(name, tp, default) for name, tp, default, _ in self.run_parameters]
        for stage in self.configured():
            params += [(stage.prefix + name, tp, default) for name, tp, default in stage.config_parameters()]
        return params

    def stage_arguments(self, values: dict[str, Any], stage_name: str) -> dict[str, Any]:
        """One stage's config fields from prefixed pipeline values, unprefixed (run-wide values
        that share the prefix, like ``pt_stage1``, are not the stage's)."""
        stage = self.stage(stage_name)
        fields = {name for name, _, _ in stage.config_parameters()}
        return {
            name[len(stage.prefix) :]: value
            for name, value in values.items()
            if name.startswith(stage.prefix) and name[len(stage.prefix) :] in fields
        }

    def stage_config(
        self, stage_name: str, preset: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> Any:
        """A stage's config: defaults, the preset's section, then explicit overrides."""
        stage = self.stage(stage_name)
        section = read_preset(preset, self.preset_sections()).get(stage.section, {}) if preset else {}
        return build_config(stage.config, section, overrides)

    def preset_arguments(self, preset: str | Path) -> dict[str, Any]:
        """A preset YAML as pipeline arguments (``pretrain.lora_rank`` -> ``pt_lora_rank``)."""
        args = {}
        run_names = {name: tp for name, tp, _, _ in self.run_parameters}
        for section, values in read_preset(preset, self.preset_sections()).items():
            if section == RUN_SECTION:
                for key, value in values.items():
                    if key not in run_names:
                        raise InputError(f"{preset}: run.{key} is not a run parameter; known: {sorted(run_names)}")
                    if not isinstance(value, run_names[key]):
                        raise InputError(f"{preset}: run.{key} must be {run_names[key].__name__}, got {value!r}")
                    args[key] = value
                continue
            stage = self.sections()[section]
            fields = {name for name, _, _ in stage.config_parameters()}
            for key, value in values.items():
                if key in stage.dag_set:
                    if value != stage.dag_set[key]:
                        raise InputError(
                            f"{preset}: {section}.{key} is set by the pipeline itself (to {stage.dag_set[key]!r}), "
                            "not a pipeline parameter"
                        )
                    continue
                if key not in fields:
                    raise InputError(f"{preset}: {section}.{key} is not a {stage.config.__name__} field")
                args[stage.prefix + key] = value
        return args

    def metrics(self) -> dict[str, Metric]:
        """Every metric any stage produces, by name."""
        return {metric.name: metric for stage in self.stages for metric in stage.metrics}

    def check_parameters(self, values: dict[str, Any]) -> dict[str, int]:
        """Every configured stage's config builds from the prefixed ``values``; one error naming
        the stage's parameters otherwise. Returns the count of values per config."""
        checked = {}
        for stage in self.configured():
            stage_values = self.stage_arguments(values, stage.name)
            try:
                build_config(
                    stage.config,
                    overrides={k: (list(v) if isinstance(v, tuple) else v) for k, v in stage_values.items()},
                )
            except (ValueError, TypeError, InputError) as err:
                raise InputError(f"pipeline parameters {stage.prefix}*: {err}") from None
            checked[stage.config.__name__] = len(stage_values)
        return checked

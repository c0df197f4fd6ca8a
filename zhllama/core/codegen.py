"""Write a recipe's Kubeflow components and its pipeline signature as plain Python files, from
its stage table and config dataclasses, so a knob is declared once (its dataclass field) and
still reads and greps like hand-written code: ``pt_lora_rank`` in the pipeline signature ->
``lora_rank=pt_lora_rank`` -> the component's ``lora_rank`` parameter -> ``PretrainConfig(lora_rank=...)``.

``make components`` writes them; a test regenerates them and fails on any difference, as for the
compiled YAML. Text only: nothing here imports kfp.
"""

from __future__ import annotations

import argparse
import importlib
import json
import textwrap
from pathlib import Path
from typing import Any

from zhllama.core.io import atomic_file
from zhllama.core.recipe import Recipe, Stage

HEADER = (
    "Written by `make components` from {table} (the stage table)\nand the config dataclasses; edit those, "
    "not this file. tests/components/test_generated.py\nfails when it differs from what they give."
)


def _type_name(tp: Any) -> str:
    return "list" if getattr(tp, "__origin__", None) is list or tp is list else tp.__name__


def _literal(value: Any) -> str:
    """A default as source text, strings double-quoted as the formatter writes them."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)


def _isort_key(name: str) -> tuple[bool, str]:
    """isort's order-by-type: CONSTANTS, then Classes, then functions."""
    return (not name.isupper(), name)


def _signature_lines(params: list[tuple[str, Any, Any]], indent: str = "    ") -> list[str]:
    return [f"{indent}{name}: {_type_name(tp)} = {_literal(default)}," for name, tp, default in params]


def component_source(recipe: Recipe, stage: Stage, table: str, launchers: str) -> str:
    """One stage's component module: a typed function whose body builds the config and makes one call."""
    # "list[Dataset]": a list of artifacts (a fan-out's dsl.Collected); the import is the artifact type
    artifact_types = sorted(
        {
            kind.removeprefix("list[").removesuffix("]")
            for kind in (*stage.inputs.values(), *stage.optional_inputs.values(), *stage.outputs.values())
        }
    )
    kinds = ["Input"] * bool(stage.inputs or stage.optional_inputs) + ["Output"] * bool(stage.outputs)
    tracking = [(n, tp, d) for n, tp, d, _ in recipe.tracking_parameters]
    extra = [(n, tp, d) for n, tp, d, _ in stage.parameters]
    fields = [] if stage.config is None else [(n, tp, d) for n, tp, d in _fields(stage)]
    prerequisites = stage.config is None and not stage.inputs and not stage.outputs
    params = recipe.pipeline_parameters() if prerequisites else [*tracking, *extra, *fields]
    lines = ['"""' + "\n".join(textwrap.wrap(stage.doc, 100)), "", HEADER.format(table=table), '"""', ""]
    if artifact_types:
        names = ", ".join(sorted({*artifact_types, *kinds}, key=_isort_key))
        lines += ["from kfp import dsl", f"from kfp.dsl import {names}", ""]
    else:
        lines += ["from kfp import dsl", ""]
    images = ["IMAGE_CPU", "IMAGE_CUDA"] if stage.gpu_variant else ["IMAGE_CPU"]
    lines += [f"from components.images import {', '.join(images)}", "", ""]
    lines += [f"def {stage.name}("]
    lines += [f"    {name}: Input[{kind}]," for name, kind in stage.inputs.items()]
    lines += [f"    {name}: Output[{kind}]," for name, kind in stage.outputs.items()]
    lines += _signature_lines(params)
    lines += [f"    {name}: Input[{kind}] = None," for name, kind in stage.optional_inputs.items()]
    package, _, module = launchers.rpartition(".")
    imports = [(package, module)]
    if stage.config is not None:
        imports.append((stage.config.__module__, stage.config.__name__))
    lines += [f") -> {stage.returns}:", '    """' + "\n    ".join(textwrap.wrap(stage.doc, 100)) + '"""']
    lines += [f"    from {where} import {name}" for where, name in sorted(imports)]
    call_prefix = "return " if stage.returns != "None" else ""
    if prerequisites:
        lines += ["", f"    {call_prefix}{module}.{stage.name}({{"]
        lines += [f'        "{name}": {name},' for name, _, _ in params]
        lines += ["    })"]
    else:
        if stage.config is not None:
            lines += ["", f"    config = {stage.config.__name__}("]
            lines += [f"        {name}={name}," for name, _, _ in fields]
            lines += ["    )"]
        else:
            lines += [""]
        args = [*stage.inputs, *stage.outputs] + (["config"] if stage.config is not None else [])
        kwargs = [*stage.optional_inputs, *(name for name, _, _ in (*extra, *tracking))]
        lines += [f"    {call_prefix}{module}.{stage.name}("]
        lines += [f"        {name}," for name in args]
        lines += [f"        {name}={name}," for name in kwargs]
        lines += ["    )"]
    lines += ["", ""]
    lines += [f"{stage.name}_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)({stage.name})"]
    if stage.gpu_variant:
        lines += [f"{stage.name}_gpu = dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)({stage.name})"]
    return "\n".join(lines) + "\n"


def _fields(stage: Stage) -> list[tuple[str, Any, Any]]:
    from zhllama.core.config import config_fields

    return config_fields(stage.config)


def signature_source(recipe: Recipe, table: str) -> str:
    """The pipeline's parameters as one typed function returning them by stage."""
    params = recipe.pipeline_parameters()
    lines = [
        f'"""The {recipe.name} pipeline\'s parameters: every run-wide one, then each stage\'s config fields\nunder its prefix.',
        "",
        HEADER.format(table=table),
        '"""',
        "",
        "from typing import Any",
        "",
        "",
        "def parameters(",
        *_signature_lines(params),
        ") -> dict[str, dict[str, Any]]:",
        '    """Every pipeline parameter: ``run`` (run-wide), ``all`` (prefixed, for the prerequisites check),',
        '    and one entry per stage with its config fields unprefixed (what that stage\'s component takes)."""',
        "    return {",
    ]
    lines += (
        ['        "run": {']
        + [f'            "{name}": {name},' for name, _, _, _ in recipe.run_parameters]
        + ["        },"]
    )
    lines += ['        "all": {'] + [f'            "{name}": {name},' for name, _, _ in params] + ["        },"]
    for stage in recipe.configured():
        lines += [f'        "{stage.name}": {{']
        lines += [f'            "{name}": {stage.prefix}{name},' for name, _, _ in stage.config_parameters()]
        lines += ["        },"]
    lines += ["    }"]
    return "\n".join(lines) + "\n"


def generated_files(
    recipe: Recipe, table: str, launchers: str, components_dir: Path, signature_file: Path
) -> dict[Path, str]:
    files = {
        components_dir / f"{stage.name}.py": component_source(recipe, stage, table, launchers)
        for stage in recipe.stages
    }
    files[signature_file] = signature_source(recipe, table)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="zhllama.recipes.chinese_llama_alpaca.stages", help="module holding RECIPE")
    parser.add_argument("--launchers", default="zhllama.recipes.chinese_llama_alpaca.launchers")
    parser.add_argument("--components", default="components")
    parser.add_argument("--signature", default="pipelines/signature.py")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    args = parser.parse_args(argv)
    module = importlib.import_module(args.recipe)
    table = module.__name__.replace(".", "/") + ".py"
    stale = []
    for path, text in generated_files(
        module.RECIPE, table, args.launchers, Path(args.components), Path(args.signature)
    ).items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            with atomic_file(path) as handle:
                handle.write(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("stale (run make components): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

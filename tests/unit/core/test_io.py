"""Atomic outputs are readable by other users (the next step may run as another uid)."""

import os
from pathlib import Path

from zhllama.core.io import atomic_dir


def test_atomic_dir_outputs_are_readable_by_other_uids(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            private = tmp / "model.safetensors"
            private.write_bytes(b"weights")
            private.chmod(0o600)  # as safetensors writes it
        mode = (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777
        assert mode == 0o644 and ((tmp_path / "out").stat().st_mode & 0o755) == 0o755
    finally:
        os.umask(old)

"""File helpers every stage uses: atomic outputs, JSON, content hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class InputError(ValueError):
    """Bad input: the message names the file (and line or field) and what was expected."""


class OutputError(OSError):
    """An output cannot be written (disk full, file size limit, no permission, read-only
    file system): the message names the output; nothing half-written is left there."""


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
# safetensors (Rust) and torch.save report the OS error only in their message
_WRITE_ERROR_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Permission denied",
    "Read-only file system",
)


def write_failure(err: BaseException) -> str | None:
    """The reason when ``err`` means "this cannot be written here", else None."""
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    return next((t for t in _WRITE_ERROR_TEXTS if t in text), None)


def _output_error(target: Path, err: BaseException) -> OutputError | None:
    reason = write_failure(err)
    if reason is None or isinstance(err, OutputError):
        return None
    return OutputError(
        f"{target}: cannot write the output ({reason}); nothing was left there: free space or fix permissions, then re-run"
    )


def _make_readable(root: Path) -> None:
    """Files the umask lets others read get read bits: some writers (safetensors via
    transformers' save_pretrained) make 0600 files, which a step running as another uid (the
    next container, a model server) could not read."""
    readable = 0o444 & ~_UMASK
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            if mode | readable != mode:
                path.chmod(mode | readable)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` when the block
    succeeds, delete it when the block raises. Readers never see a half-written output; a
    full disk or a denied write becomes one ``OutputError`` naming ``target``."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise (_output_error(target, err) or err) from None
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _output_error(target, err)
        if failure is not None:
            raise failure from err
        raise
    _make_readable(tmp)
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} already exists")
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        os.replace(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside ``target`` for writing; rename it into place when whole."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as err:
        raise (_output_error(target, err) or err) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failure = _output_error(target, err)
        if failure is not None:
            raise failure from err
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One hash over the contents of several files, in the order given (names do not count)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def fetch_dir(uri: str, out_dir: str | os.PathLike[str], check: Callable[[Path], Any] | None = None) -> Path:
    """Copy a folder into ``out_dir``, whole or not at all: a local path, or any URL fsspec
    reads (``s3://bucket/prefix`` with credentials and endpoint from the environment; ``gs://``
    and others when their fsspec package is installed). ``check`` sees the copy before it
    lands and raises to refuse it."""
    with atomic_dir(out_dir) as tmp:
        if "://" in uri:
            import fsspec

            options = (
                {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
                if (uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"))
                else {}
            )
            try:
                fs, root = fsspec.core.url_to_fs(uri, **options)
                if not fs.isdir(root):
                    raise InputError(f"{uri}: no folder there")
                fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
            except (ImportError, ValueError) as err:
                raise InputError(f"{uri}: cannot read this URL ({err})") from None
        else:
            if not Path(uri).is_dir():
                raise InputError(f"{uri}: folder not found")
            shutil.copytree(uri, tmp, dirs_exist_ok=True)
        if check is not None:
            check(tmp)
    return Path(out_dir)

"""Durable checkpoints: every local checkpoint of a training step mirrored to the object store
under ``<checkpoint_uri>/<pipeline run>/<task>/checkpoint-N/``, so a retried step (a preempted
pod, a killed container) resumes where the last one got to, on another node with an empty disk.

* **In the background**: the loop hands a finished local checkpoint over (a hard-linked
  snapshot, so local retention may delete the original) and goes on training; one uploader
  thread sends it. When the store is down the upload is retried with backoff; a newer
  checkpoint handed over meanwhile replaces the one waiting, so the thread never falls behind.
* **Atomic**: ``MANIFEST.json`` (every file's size and sha256) is written last. A checkpoint
  without one, or whose files do not match it, is never taken: resume falls back to the newest
  one that is whole.
* **Retention**: after each complete upload only the newest ``keep`` complete checkpoints stay
  there (and half-uploads older than the newest complete one go).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhllama.core.io import InputError, atomic_dir, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PREFIX = "checkpoint-"
DISABLED = ("none", "off", "false")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix")."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise InputError(f"checkpoint_uri {uri!r}: expected s3://bucket[/prefix]")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def resolve_uri(checkpoint_uri: str, run: str, task: str) -> str:
    """Where one task's checkpoints go: ``checkpoint_uri`` (empty: $ZHLLAMA_CHECKPOINT_URI, else
    s3://<the checkpoint bucket>), then the pipeline run and the task; "" when disabled ("none")
    or when the step knows no run (a bare CLI run)."""
    from zhllama.core.settings import get_settings

    base = checkpoint_uri or os.environ.get("ZHLLAMA_CHECKPOINT_URI") or f"s3://{get_settings().checkpoint_bucket}"
    if base.lower() in DISABLED or not run or not task:
        return ""
    parse_s3_uri(base)
    return f"{base.rstrip('/')}/{_safe(run)}/{_safe(task)}"


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in part)


def client(timeout: float = 10.0):
    """An S3 client from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY: what MLflow and DVC read), else the local services' settings; short
    timeouts and no inner retries, so the uploader's own backoff decides."""
    import boto3
    from botocore.config import Config

    from zhllama.core.settings import get_settings

    settings = get_settings()
    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or settings.s3_endpoint,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or settings.s3_access_key,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or settings.s3_secret_key,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout * 3,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def _step_of(name: str) -> int:
    return int(name[len(PREFIX) :]) if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() else -1


def put_folder(s3: Any, bucket: str, prefix: str, folder: Path, skip: tuple[str, ...] = ()) -> int:
    """Every file under ``folder`` (sub-folders too, but not the top-level names in ``skip``) to
    ``s3://bucket/prefix/``, then ``MANIFEST.json`` (relative path -> size, sha256) last; bytes sent.
    A manifest already there goes first, so a folder being rewritten never looks whole."""
    files = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }
    manifest = {"files": {name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for name, p in files.items()}}
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    for name, path in files.items():
        s3.upload_file(str(path), bucket, f"{prefix}/{name}")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=json.dumps(manifest).encode())
    return sum(m["size"] for m in manifest["files"].values())


def read_manifest(s3: Any, bucket: str, prefix: str) -> dict[str, Any] | None:
    """A folder's manifest when the folder is whole (manifest there, every file at its size); None otherwise."""
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except Exception as err:
        if not any(mark in str(err) for mark in ("NoSuchKey", "404", "Not Found")):
            raise
        return None
    for name, meta in manifest["files"].items():
        try:
            size = s3.head_object(Bucket=bucket, Key=f"{prefix}/{name}")["ContentLength"]
        except Exception:
            return None
        if size != meta["size"]:
            return None
    return manifest


def get_folder(s3: Any, uri: str, target: Path) -> dict[str, Any]:
    """``uri`` (a folder put_folder wrote) into ``target``, whole or not at all, every file
    checked against its sha256; fails naming the URI when it is not whole."""
    bucket, prefix = parse_s3_uri(uri)
    manifest = read_manifest(s3, bucket, prefix)
    if manifest is None:
        raise InputError(f"{uri}: no complete folder there (no MANIFEST.json, or files missing)")
    with atomic_dir(target) as tmp:
        for name, meta in manifest["files"].items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, f"{prefix}/{name}", str(tmp / name))
            if sha256_file(tmp / name) != meta["sha256"]:
                raise InputError(f"{uri}/{name}: sha256 differs from the manifest")
    return manifest


@dataclass
class Upload:
    step: int
    bytes: int
    seconds: float
    attempts: int


@dataclass
class CheckpointStore:
    """One task's checkpoints in the object store (``uri`` as resolve_uri gives it)."""

    uri: str
    keep: int = 2
    retry_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    s3: Any = None
    uploads: list[Upload] = field(default_factory=list)
    failures: int = 0

    def __post_init__(self) -> None:
        self.bucket, self.prefix = parse_s3_uri(self.uri)
        self.s3 = self.s3 or client()
        self._pending: Path | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._give_up_at: float | None = None

    # --- reading ------------------------------------------------------------------------------

    def _key(self, step: int, name: str = "") -> str:
        return f"{self.prefix}/{PREFIX}{step}/{name}" if self.prefix else f"{PREFIX}{step}/{name}"

    def steps(self) -> list[int]:
        """Steps with anything under them (complete or not), ascending."""
        found: set[int] = set()
        paginator = self.s3.get_paginator("list_objects_v2")
        root = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                step = _step_of(common["Prefix"][len(root) :].rstrip("/"))
                if step >= 0:
                    found.add(step)
        return sorted(found)

    def manifest(self, step: int) -> dict[str, Any] | None:
        """The checkpoint's manifest when it is complete (manifest there, every file at its size)."""
        return read_manifest(self.s3, self.bucket, self._key(step).rstrip("/"))

    def complete_steps(self) -> list[int]:
        return [s for s in self.steps() if self.manifest(s) is not None]

    def latest(self) -> int | None:
        for step in reversed(self.steps()):
            if self.manifest(step) is not None:
                return step
        return None

    def download_latest(self, run_dir: Path, attempts: int = 5) -> Path | None:
        """The newest complete checkpoint, into ``run_dir/checkpoints/checkpoint-N`` (each file
        checked against the manifest's sha256); None when the store has none. Local checkpoints
        of an earlier attempt are dropped first: the store is what a retry trusts. Fails, naming
        the URI, when the store does not answer after ``attempts`` tries."""
        for attempt in range(attempts):
            try:
                steps = self.steps()
                break
            except Exception as err:
                if "NoSuchBucket" in str(err):  # a first run against a fresh store: nothing to resume
                    self.s3.create_bucket(Bucket=self.bucket)
                    log.info("created bucket s3://%s for durable checkpoints", self.bucket)
                    steps = []
                    break
                if attempt == attempts - 1:
                    raise InputError(
                        f"{self.uri}: the object store does not answer ({type(err).__name__}: {err}); a retried "
                        "step would lose its progress, so this one stops (checkpoint_uri=none trains without)"
                    ) from None
                time.sleep(min(self.retry_seconds * 2**attempt, self.retry_max_seconds))
        local_root = run_dir / "checkpoints"
        shutil.rmtree(local_root, ignore_errors=True)
        for step in reversed(steps):
            manifest = self.manifest(step)
            if manifest is None:
                log.warning("%s: checkpoint-%d is incomplete (no manifest or short files), skipped", self.uri, step)
                continue
            started = time.perf_counter()
            target = local_root / f"{PREFIX}{step}"
            try:
                get_folder(self.s3, f"s3://{self.bucket}/{self._key(step).rstrip('/')}", target)
            except Exception as err:
                log.warning(
                    "%s: checkpoint-%d could not be fetched whole (%s), trying an older one", self.uri, step, err
                )
                continue
            log.info(
                "durable checkpoint %s/%s%d fetched in %.1f s (%.1f MB)",
                self.uri,
                PREFIX,
                step,
                time.perf_counter() - started,
                sum(m["size"] for m in manifest["files"].values()) / 1e6,
            )
            return target
        return None

    # --- writing ------------------------------------------------------------------------------

    def submit(self, checkpoint_dir: Path) -> None:
        """Hand a finished local checkpoint over; returns at once. A snapshot of hard links
        is taken now (local retention may delete the folder before the upload ends)."""
        snapshot = checkpoint_dir.parent.parent / ".upload" / checkpoint_dir.name
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        for path in checkpoint_dir.iterdir():
            try:
                os.link(path, snapshot / path.name)
            except OSError:
                shutil.copy2(path, snapshot / path.name)
        with self._cond:
            if self._pending is not None:  # superseded before it was sent: the newer one is what matters
                shutil.rmtree(self._pending, ignore_errors=True)
            self._pending = snapshot
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                snapshot, self._pending, self._busy = self._pending, None, True
            try:
                self._upload_with_retries(snapshot)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload_with_retries(self, snapshot: Path) -> None:
        step, attempt, started = _step_of(snapshot.name), 0, time.perf_counter()
        while True:
            attempt += 1
            try:
                size = self._upload(step, snapshot)
                self.uploads.append(Upload(step, size, time.perf_counter() - started, attempt))
                log.info(
                    "durable checkpoint %s/%s%d: %.1f MB in %.1f s%s",
                    self.uri,
                    PREFIX,
                    step,
                    size / 1e6,
                    time.perf_counter() - started,
                    f" (after {attempt} attempts)" if attempt > 1 else "",
                )
                self._retain(step)
                return
            except Exception as err:
                self.failures += 1
                delay = min(self.retry_seconds * 2 ** (attempt - 1), self.retry_max_seconds)
                log.warning(
                    "durable checkpoint %s%d: upload attempt %d failed (%s: %s); retrying in %.0f s, training goes on",
                    PREFIX,
                    step,
                    attempt,
                    type(err).__name__,
                    str(err)[:200],
                    delay,
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None, timeout=delay)
                    if self._pending is not None:  # a newer checkpoint came: send that one instead
                        log.info("durable checkpoint %s%d superseded by a newer one before it was stored", PREFIX, step)
                        return
                    if self._closed and self._give_up_at is not None and time.monotonic() > self._give_up_at:
                        log.error("durable checkpoint %s%d: not stored before the step ended", PREFIX, step)
                        return

    def _upload(self, step: int, snapshot: Path) -> int:
        return put_folder(self.s3, self.bucket, self._key(step).rstrip("/"), snapshot)

    def _retain(self, newest: int) -> None:
        if self.keep <= 0:
            return
        try:
            steps = self.steps()
            complete = [s for s in steps if s <= newest and self.manifest(s) is not None]
            drop = set(complete[: -self.keep]) | {s for s in steps if s < newest and s not in complete}
            for step in sorted(drop):
                self.delete(step)
        except Exception as err:  # the next checkpoint's retention tries again
            log.warning("durable checkpoints: retention failed (%s)", err)

    def delete(self, step: int) -> None:
        """Manifest first (the checkpoint stops counting at once), then its files."""
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(step, MANIFEST))
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self._key(step))
        for obj in listed.get("Contents", []):
            self.s3.delete_object(Bucket=self.bucket, Key=obj["Key"])

    def clear(self) -> int:
        """Delete everything under this task's prefix (its checkpoints, a TrainJob's staged
        inputs and output): what a step does once it has succeeded, since KFP never retries a
        step that succeeded, and its output artifact holds the result. Objects deleted."""
        paginator = self.s3.get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/")
            for obj in page.get("Contents", [])
        ]
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            )
        return len(keys)

    def close(self, timeout: float = 300.0) -> bool:
        """Wait (at most ``timeout``) for the last checkpoint handed over to be stored; True when
        nothing is left to send. The step's outputs do not depend on it, so a store that stays
        down only costs a warning here."""
        with self._cond:
            self._closed, self._give_up_at = True, time.monotonic() + timeout
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout=timeout)
        if not done:
            log.warning("durable checkpoints: the last upload to %s did not finish within %.0f s", self.uri, timeout)
        return done

    def summary(self) -> dict[str, float]:
        if not self.uploads:
            return {"checkpoint_uploads": 0, "checkpoint_upload_failures": self.failures}
        return {
            "checkpoint_uploads": len(self.uploads),
            "checkpoint_upload_failures": self.failures,
            "checkpoint_mb": self.uploads[-1].bytes / 1e6,
            "checkpoint_upload_seconds_mean": sum(u.seconds for u in self.uploads) / len(self.uploads),
        }

"""The container engine and the step images, on this machine (``make engine``, ``make images``).

- **Engine**: a Docker engine that is already running (``$DOCKER_HOST`` or the default socket)
  is used as it is. Otherwise the project starts its own ``dockerd`` (Debian's ``docker.io``;
  ``make setup-containers`` installs it) on a unix socket in the state dir, with its data there
  too, no iptables and no bridge (steps use the host network), stopped by PID like the other
  services.
- **Base image**: ``$ZHLLAMA_BASE_IMAGE``, else ``python:3.11-slim`` when present or pullable,
  else a local Debian bookworm base (python3 3.11, venv, CA certificates) made with
  ``mmdebstrap`` from Debian's packages and ``docker import``-ed, for machines that reach no
  container registry.
- **Build**: BuildKit (``RUN --mount``), so the host's CA bundle (the package registries may sit
  behind TLS interception) is a build secret and the local torch wheel a bind mount: neither
  becomes a layer of the image. The image is tagged twice: with the tag the compiled pipeline
  names (the project version, or ``$ZHLLAMA_IMAGE_TAG``), and with ``<version>-<code hash>`` so a
  local run's cache keys change exactly when the image's contents do.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from zhllama import __version__
from zhllama.core.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/docker.sock"
LOCAL_BASE = "zhllama-base:bookworm-py3.11"
UPSTREAM_BASE = "python:3.11-slim"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What goes into the image (images/Dockerfile.cpu COPYs exactly these); their hash is the code tag.
IMAGE_INPUTS = (
    "requirements.lock",
    "pyproject.toml",
    "data.dvc",
    ".dvc/config",
    "zhllama",
    "components",
    "pipelines",
    "configs",
)
STEP_UID = 1000  # the image's USER; its HOME and caches are group-0 writable for any uid a cluster assigns


class ContainerError(RuntimeError):
    """No engine, no builder, or a build that failed: one line that says which."""


# --- the engine ----------------------------------------------------------------------------------


def engine_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).engine_dir


def own_socket(settings: Settings | None = None) -> Path:
    return engine_dir(settings) / "docker.sock"


def docker_cli() -> str:
    """A docker CLI that can build with BuildKit: ``$ZHLLAMA_DOCKER``, else the first on PATH
    (or Debian's /usr/bin/docker) with BuildKit built in (before 23) or a buildx plugin."""
    if os.environ.get("ZHLLAMA_DOCKER"):
        return os.environ["ZHLLAMA_DOCKER"]
    candidates = [p for p in dict.fromkeys([shutil.which("docker"), "/usr/bin/docker"]) if p and os.access(p, os.X_OK)]
    for cli in candidates:
        try:
            version = subprocess.run(
                [cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, timeout=20
            ).stdout
            major = int(version.strip().split(".")[0] or 0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        if major and major < 23:
            return cli
        if subprocess.run([cli, "buildx", "version"], capture_output=True, timeout=20).returncode == 0:
            return cli
    if candidates:
        return candidates[0]
    raise ContainerError("no docker CLI: run `make setup-containers` (installs Debian's docker.io) or install Docker")


def _answers(host: str) -> bool:
    try:
        cli = docker_cli()
    except ContainerError:
        return False
    try:
        done = subprocess.run(
            [cli, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "DOCKER_HOST": host},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def docker_host(settings: Settings | None = None) -> str | None:
    """The engine to use: ``$DOCKER_HOST`` or the default socket when it answers, else the
    project's own engine when it runs; None when there is none."""
    candidates = [os.environ.get("DOCKER_HOST"), f"unix://{DEFAULT_SOCKET}", f"unix://{own_socket(settings)}"]
    for host in dict.fromkeys(c for c in candidates if c):
        if host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
            continue
        if _answers(host):
            return host
    return None


def _engine_pid(settings: Settings) -> int | None:
    try:
        pid = int((engine_dir(settings) / "dockerd.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def start_engine(settings: Settings | None = None, timeout: float = 60) -> str:
    """The DOCKER_HOST of a working engine, starting the project's own when none answers."""
    settings = settings or get_settings()
    if host := docker_host(settings):
        return host
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None)
    if dockerd is None:
        raise ContainerError(
            "no container engine answers and dockerd is not installed: run `make setup-containers` "
            "(Debian's docker.io; needs root) or point DOCKER_HOST at a Docker engine"
        )
    root = engine_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    sock = own_socket(settings)
    sock.unlink(missing_ok=True)
    cmd = [
        dockerd,
        "--host",
        f"unix://{sock}",
        "--data-root",
        str(root / "data"),
        "--exec-root",
        str(root / "x"),
        "--pidfile",
        str(root / "dockerd.pid"),
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
    ]
    log_path = root / "dockerd.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    host = f"unix://{sock}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sock.exists() and _answers(host):
            log.info("container engine up: %s (pid %d, data %s)", host, proc.pid, root / "data")
            return host
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-1500:]
    raise ContainerError(
        f"dockerd {'exited' if proc.poll() is not None else 'did not answer'}; last lines of {log_path}:\n{tail}"
    )


def stop_engine(settings: Settings | None = None, timeout: float = 20) -> bool:
    """Stop the project's own engine by its PID (an engine the machine runs is left alone)."""
    settings = settings or get_settings()
    pid = _engine_pid(settings)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)  # dockerd stops its containerd and containers itself
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    _unmount_below(engine_dir(settings) / "x")
    log.info("stopped the container engine (pid %d)", pid)
    return True


def _unmount_below(root: Path) -> None:
    """Unmount what the engine left mounted under its exec-root (dockerd keeps the host network
    namespace bound at ``netns/default``), so the project folder can be removed afterwards."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(root.resolve()) + "/"
    points = [fields[1] for fields in map(str.split, mounts) if len(fields) > 1 and fields[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):  # the deepest first
        done = subprocess.run(["umount", point], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("could not unmount %s: %s", point, done.stderr.strip())


def engine_env(settings: Settings | None = None) -> dict[str, str]:
    host = docker_host(settings)
    if host is None:
        raise ContainerError(
            "no container engine answers: `make engine` starts the project's own (after `make setup-containers`)"
        )
    return {**os.environ, "DOCKER_HOST": host, "DOCKER_BUILDKIT": "1"}


# --- images --------------------------------------------------------------------------------------


def code_version(root: Path = PROJECT_ROOT, kind: str = "cpu") -> str:
    """A hash of what the image holds (IMAGE_INPUTS and its Dockerfile), 12 hex digits."""
    digest = hashlib.sha256()
    files = [root / "images" / f"Dockerfile.{kind}"]
    for name in IMAGE_INPUTS:
        path = root / name
        files += (
            sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if path.is_dir()
            else [path]
        )
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def local_tag(image: str, code: str | None = None) -> str:
    """``registry/name:<version>-<code hash>``: the tag a local container run names."""
    return f"{image.rsplit(':', 1)[0]}:{__version__}-{code or code_version()}"


def _image_exists(cli: str, env: dict[str, str], image: str) -> bool:
    return subprocess.run([cli, "image", "inspect", image], capture_output=True, env=env).returncode == 0


def ca_bundle() -> str | None:
    """The CA bundle the host's pip (or SSL) settings name, if any: the build trusts the same."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return os.environ[var]
    for conf in (
        "/etc/pip.conf",
        "/etc/xdg/pip/pip.conf",
        str(Path.home() / ".config/pip/pip.conf"),
        str(Path.home() / ".pip/pip.conf"),
    ):
        parser = configparser.ConfigParser()
        try:
            parser.read(conf)
        except configparser.Error:
            continue
        cert = parser.get("global", "cert", fallback=None)
        if cert and Path(cert).is_file():
            return cert
    return None


def _reachable(url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def base_image(cli: str, env: dict[str, str]) -> str:
    """``$ZHLLAMA_BASE_IMAGE``; else python:3.11-slim when present or pullable; else the local
    Debian base (built once)."""
    if os.environ.get("ZHLLAMA_BASE_IMAGE"):
        return os.environ["ZHLLAMA_BASE_IMAGE"]
    if _image_exists(cli, env, UPSTREAM_BASE):
        return UPSTREAM_BASE
    pulled = subprocess.run([cli, "pull", "-q", UPSTREAM_BASE], capture_output=True, text=True, env=env, timeout=600)
    if pulled.returncode == 0:
        return UPSTREAM_BASE
    log.info(
        "cannot pull %s (%s): using the local Debian base %s",
        UPSTREAM_BASE,
        pulled.stderr.strip().splitlines()[-1:] or "",
        LOCAL_BASE,
    )
    if not _image_exists(cli, env, LOCAL_BASE):
        build_local_base(cli, env)
    return LOCAL_BASE


def build_local_base(cli: str, env: dict[str, str]) -> None:
    """Debian bookworm minbase with python3 (3.11), venv and CA certificates, from Debian's packages."""
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ContainerError(
            f"no registry to pull {UPSTREAM_BASE} from and no mmdebstrap to build a local base: "
            "run `make setup-containers` (or set ZHLLAMA_BASE_IMAGE to an image the engine has)"
        )
    work = engine_dir() / "base"
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "rootfs.tar"
    started = time.perf_counter()
    log.info("building the local base image %s with mmdebstrap (about a minute)", LOCAL_BASE)
    subprocess.run(
        [
            mmdebstrap,
            "--quiet",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(tar),
        ],
        check=True,
    )
    subprocess.run(
        [cli, "import", "--change", 'CMD ["python3"]', str(tar), LOCAL_BASE],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    tar.unlink()
    log.info("base image %s built in %.0f s", LOCAL_BASE, time.perf_counter() - started)


def _stage_wheels(root: Path) -> Path:
    """Hard links (copies across file systems) of $PIP_FIND_LINKS' wheels under .build/wheels:
    the build bind-mounts them, so torch's CPU wheel needs no index."""
    target = root / ".build" / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    source = Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels"))
    wanted = {p.name: p for p in source.glob("*.whl")} if source.is_dir() else {}
    for old in target.glob("*.whl"):
        if old.name not in wanted:
            old.unlink()
    for name, path in wanted.items():
        dest = target / name
        if dest.exists() and dest.stat().st_size == path.stat().st_size:
            continue
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)
    return target


def build_image(image: str, kind: str = "cpu", push: bool = False, root: Path = PROJECT_ROOT) -> dict[str, object]:
    """Build images/Dockerfile.<kind> as ``image`` (the tag the pipeline names) and its code tag;
    returns the tags, build seconds and size."""
    cli = docker_cli()
    env = engine_env()
    base = base_image(cli, env)
    _stage_wheels(root)
    code = code_version(root, kind)
    tags = list(dict.fromkeys([image, local_tag(image, code)]))
    cmd = [
        cli,
        "build",
        "--network",
        "host",
        "-f",
        str(root / "images" / f"Dockerfile.{kind}"),
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"GIT_COMMIT={_git_commit(root)}",
        "--build-arg",
        f"CODE_VERSION={code}",
    ]
    if kind == "cpu" and _reachable(TORCH_CPU_INDEX + "/"):
        cmd += ["--build-arg", f"TORCH_INDEX={TORCH_CPU_INDEX}"]
    if cert := ca_bundle():
        cmd += ["--secret", f"id=ca,src={cert}"]
    for tag in tags:
        cmd += ["-t", tag]
    cmd.append(str(root))
    log.info("building %s (base %s): %s", tags[0], base, " ".join(cmd))
    started = time.perf_counter()
    done = subprocess.run(cmd, env={**env, "BUILDKIT_PROGRESS": os.environ.get("BUILDKIT_PROGRESS", "plain")})
    if done.returncode != 0:
        raise ContainerError(
            f"building images/Dockerfile.{kind} failed (exit {done.returncode}); the build log is above"
        )
    seconds = time.perf_counter() - started
    size = subprocess.run(
        [cli, "image", "inspect", "--format", "{{.Size}}", tags[0]], capture_output=True, text=True, env=env
    ).stdout.strip()
    _drop_stale_code_tags(cli, env, tags[-1])
    if push:
        for tag in tags:
            subprocess.run([cli, "push", tag], check=True, env=env)
    result = {"tags": tags, "base": base, "seconds": round(seconds, 1), "size_mb": round(int(size or 0) / 1e6)}
    log.info("built %s in %.0f s, %s MB", ", ".join(tags), seconds, result["size_mb"])
    return result


_MANIFESTS = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def image_in_registry(image: str, timeout: float = 5) -> tuple[bool | None, str]:
    """Whether ``registry/repository:tag`` exists, by the registry's v2 API (anonymous, or
    ``$ZHLLAMA_REGISTRY_USERNAME``/``$ZHLLAMA_REGISTRY_PASSWORD`` for the token): True, False,
    or None when the registry cannot say (unreachable, needs other credentials); and why."""
    import base64
    import re

    reference, _, tag = image.rpartition(":")
    if not reference or "/" in tag:
        return None, f"{image}: no tag"
    host, _, repository = reference.partition("/")
    if not repository or ("." not in host and ":" not in host and host != "localhost"):
        host, repository = "registry-1.docker.io", reference if "/" in reference else f"library/{reference}"
    scheme = "http" if host.startswith(("localhost", "127.")) else "https"
    url = f"{scheme}://{host}/v2/{repository}/manifests/{tag}"
    user, password = os.environ.get("ZHLLAMA_REGISTRY_USERNAME"), os.environ.get("ZHLLAMA_REGISTRY_PASSWORD")

    def head(headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        request = urllib.request.Request(url, method="HEAD", headers={"Accept": _MANIFESTS, **headers})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers)

    try:
        status, headers = head({})
        challenge = headers.get("WWW-Authenticate") or headers.get("Www-Authenticate") or ""
        if status == 401 and challenge.lower().startswith("bearer"):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = urllib.parse.urlencode(
                {"service": fields.get("service", host), "scope": f"repository:{repository}:pull"}
            )
            token_request = urllib.request.Request(f"{fields['realm']}?{query}")
            if user and password:
                token_request.add_header(
                    "Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                )
            with urllib.request.urlopen(token_request, timeout=timeout) as response:
                body = json.loads(response.read())
            status, _ = head({"Authorization": f"Bearer {body.get('token') or body.get('access_token')}"})
        elif status == 401 and user and password:
            status, _ = head({"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        return None, f"{host} did not answer ({getattr(err, 'reason', err)})"
    if status == 200:
        return True, f"found at {url}"
    if status == 404:
        return False, f"HTTP 404 from {url}"
    return None, f"HTTP {status} from {url} (credentials: ZHLLAMA_REGISTRY_USERNAME/ZHLLAMA_REGISTRY_PASSWORD)"


def _drop_stale_code_tags(cli: str, env: dict[str, str], current: str) -> None:
    """Untag earlier ``<version>-<code hash>`` builds of the same repository (each is ~2.7 GB of
    layers once nothing else shares them); the version tag and other tags are left alone."""
    import re

    repository = current.rsplit(":", 1)[0]
    listed = subprocess.run(
        [cli, "image", "ls", repository, "--format", "{{.Tag}}"], capture_output=True, text=True, env=env
    ).stdout.split()
    stale = [
        f"{repository}:{t}"
        for t in listed
        if re.fullmatch(rf"{re.escape(__version__)}-[0-9a-f]{{12}}", t) and f"{repository}:{t}" != current
    ]
    if stale:
        subprocess.run([cli, "image", "rm", *stale], capture_output=True, env=env)
        subprocess.run([cli, "image", "prune", "-f"], capture_output=True, env=env)
        log.info("untagged %d earlier code builds of %s", len(stale), repository)


def _git_commit(root: Path) -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = argv if argv is not None else sys.argv[1:]
    action = args[0] if args else "status"
    try:
        if action == "up":
            print(f"container engine: {start_engine()}")
        elif action == "down":
            stop_engine()
        elif action == "status":
            host = docker_host()
            print(json.dumps({"docker_host": host, "own_engine_pid": _engine_pid(get_settings())}))
            return 0 if host else 1
        elif action == "env":
            host = docker_host()
            if host is None:
                raise ContainerError("no container engine answers: `make engine` starts the project's own")
            print(f"export DOCKER_HOST={host}")
        elif action == "code-version":
            print(code_version())
        else:
            print("usage: python -m zhllama.core.containers up|down|status|env|code-version", file=sys.stderr)
            return 2
    except ContainerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# A line of a compiled pipeline that names a zhllama image: indent, repository, tag. A step's
# image, or a constant argument naming one (trainjob_image: the image a training step's TrainJob runs).
_IMAGE_LINE = re.compile(r"^(\s*(?:image|constant): )(\S+/zhllama-(?:cpu|cuda)):(\S+)$", re.MULTILINE)


def images_in(compiled: str) -> list[str]:
    """The zhllama images a compiled pipeline's YAML names, each once."""
    return list(dict.fromkeys(f"{m[2]}:{m[3]}" for m in _IMAGE_LINE.finditer(compiled)))


def retag(compiled: str, tag: str | Callable[[str], str]) -> str:
    """The compiled YAML with its zhllama images under another tag (the commit CI pushed, or a
    local code tag): ``tag`` is the tag, or a function of the repository giving the whole image."""
    if not _IMAGE_LINE.search(compiled):
        raise ValueError("the compiled pipeline names no zhllama image: compile it with `make compile`")
    whole = tag if callable(tag) else (lambda repository: f"{repository}:{tag}")
    return _IMAGE_LINE.sub(lambda m: f"{m[1]}{whole(m[2])}", compiled)

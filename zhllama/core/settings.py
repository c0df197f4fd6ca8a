"""One place for ports, paths and credentials of the local services.

Every value comes from an environment variable with a local-only default, so a cluster
deployment overrides them and nothing secret is ever committed. The defaults bind to
127.0.0.1 and use ports unlikely to clash with other local servers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The project folder: $ZHLLAMA_PROJECT_DIR, else the checkout the package sits in (editable
# install, the image's /opt/zhllama), else the working directory (a wheel in site-packages).
PROJECT_ROOT = Path(
    os.environ.get("ZHLLAMA_PROJECT_DIR")
    or (PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else Path.cwd())
).resolve()


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    """Where the local object store and MLflow server live, and how to reach them."""

    host: str = field(default_factory=lambda: _env("ZHLLAMA_HOST", "127.0.0.1"))
    state_dir: Path = field(default_factory=lambda: Path(_env("ZHLLAMA_STATE_DIR", str(PROJECT_ROOT / ".services"))))
    # The project's own container engine (make engine): socket, images and layers. Apart from
    # state_dir, so services started elsewhere (the test fixture's) share the one engine and its images.
    engine_dir: Path = field(
        default_factory=lambda: Path(_env("ZHLLAMA_ENGINE_DIR", str(PROJECT_ROOT / ".services" / "docker")))
    )
    s3_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_S3_PORT", "18333")))
    weed_master_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_WEED_MASTER_PORT", "19333")))
    weed_volume_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_WEED_VOLUME_PORT", "18080")))
    weed_filer_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_WEED_FILER_PORT", "18888")))
    mlflow_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_MLFLOW_PORT", "15000")))
    # `zhllama serve`: the registered model's scoring server.
    serve_port: int = field(default_factory=lambda: int(_env("ZHLLAMA_SERVE_PORT", "15080")))
    # Local-only credentials for the embedded object store; a cluster sets real ones from a secret.
    s3_access_key: str = field(default_factory=lambda: _env("ZHLLAMA_S3_ACCESS_KEY", "zhllama"))
    s3_secret_key: str = field(default_factory=lambda: _env("ZHLLAMA_S3_SECRET_KEY", "zhllama-local-only"))
    mlflow_bucket: str = field(default_factory=lambda: _env("ZHLLAMA_MLFLOW_BUCKET", "mlflow"))
    dvc_bucket: str = field(default_factory=lambda: _env("ZHLLAMA_DVC_BUCKET", "dvc"))
    # Training steps' durable checkpoints (s3://<bucket>/<pipeline run>/<task>/checkpoint-N/).
    checkpoint_bucket: str = field(default_factory=lambda: _env("ZHLLAMA_CHECKPOINT_BUCKET", "checkpoints"))
    # Files a checkout has; each can point elsewhere when the package is installed on its own.
    mlflow_server_script: Path = field(
        default_factory=lambda: Path(_env("ZHLLAMA_MLFLOW_SERVER_SCRIPT", str(PROJECT_ROOT / "mlflow" / "server.sh")))
    )
    data_dvc_file: Path = field(default_factory=lambda: Path(_env("ZHLLAMA_DATA_DVC", str(PROJECT_ROOT / "data.dvc"))))
    shared_dir: Path = field(
        default_factory=lambda: Path(_env("ZHLLAMA_SHARED_DIR", str(PROJECT_ROOT.parent / "shared")))
    )

    @property
    def s3_endpoint(self) -> str:
        return os.environ.get("ZHLLAMA_S3_ENDPOINT", f"http://{self.host}:{self.s3_port}")

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("ZHLLAMA_MLFLOW_URI", f"http://{self.host}:{self.mlflow_port}")

    def s3_env(self) -> dict[str, str]:
        """Environment for any S3 client (boto3, DVC, MLflow) talking to the object store."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
        }


def get_settings() -> Settings:
    return Settings()


def shell_exports(settings: Settings | None = None) -> str:
    """``export`` lines for the S3/MLflow environment, for Makefile recipes and shells."""
    settings = settings or get_settings()
    env = {**settings.s3_env(), "MLFLOW_TRACKING_URI": settings.mlflow_uri}
    return "\n".join(f"export {key}={value}" for key, value in env.items())


if __name__ == "__main__":
    print(shell_exports())

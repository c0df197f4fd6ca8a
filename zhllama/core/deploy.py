"""Cluster serving by manifest: a KServe ``InferenceService`` for the registered version that
holds an alias, served by KServe's Hugging Face runtime (OpenAI-compatible API) straight from
the model's Hugging Face folder in the object store.

The folder is the one the registered pyfunc carries (``<logged model>/artifacts/model``: weights,
tokenizer, config), so what the cluster serves is byte for byte what was registered and
smoke-tested. Credentials are named, never written: the predictor runs as a ServiceAccount whose
Secret holds the S3 keys (KServe's convention; ``deploy/kserve/serving-account.yaml``), as the
pipeline's steps read theirs from the ``zhllama-s3`` Secret. The manifest is built from the
``kserve`` SDK's models, so a field the CRD does not know cannot be written.
"""

from __future__ import annotations

import os
import re
from typing import Any

from zhllama.core import tracking
from zhllama.core.settings import get_settings

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
HF_MODEL_DIR = "artifacts/model"  # inside the pyfunc's artifact location (serving.MODEL_ARTIFACT)
# Per predictor pod; the tiny default fits in far less, a 7B in bf16 needs a GPU and ~16 GB.
RESOURCES = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}


class DeployError(RuntimeError):
    """The alias, the version's artifacts or the cluster refused."""


def artifacts_destination() -> str:
    """Where the tracking server stores ``mlflow-artifacts:/`` (its --artifacts-destination)."""
    return os.environ.get("ZHLLAMA_MLFLOW_ARTIFACTS_DESTINATION", f"s3://{get_settings().mlflow_bucket}")


def model_folder_uri(model_name: str, alias: str, uri: str | None = None) -> tuple[str, str]:
    """(version, s3:// URI of its Hugging Face folder) for the version holding ``alias``."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        raise DeployError(f"model {model_name!r} has no alias {alias!r}: {err.message}") from None
    model_id = version.model_id or version.source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    if location.startswith("mlflow-artifacts:/"):
        location = artifacts_destination().rstrip("/") + "/" + location.removeprefix("mlflow-artifacts:/").lstrip("/")
    if not location.startswith("s3://"):
        raise DeployError(f"{model_name} version {version.version}: artifacts at {location}, not in an object store")
    return str(version.version), f"{location.rstrip('/')}/{HF_MODEL_DIR}"


def service_name(model_name: str, alias: str) -> str:
    """A DNS-1035 label (KServe's rule for InferenceService names), at most 45 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{alias}".lower()).strip("-")
    name = name if name[:1].isalpha() else f"m-{name}"
    return name[:45].rstrip("-")


def inference_service(
    model_name: str,
    alias: str = "champion",
    namespace: str = "kubeflow-user-example-com",
    service_account: str = "zhllama-serving",
    uri: str | None = None,
) -> dict[str, Any]:
    """The InferenceService (a plain dict, as the Kubernetes API takes it)."""
    version, storage_uri = model_folder_uri(model_name, alias, uri)
    return render(model_name, alias, version, storage_uri, namespace, service_account)


def render(
    model_name: str, alias: str, version: str, storage_uri: str, namespace: str, service_account: str
) -> dict[str, Any]:
    import kserve
    from kubernetes import client as k8s

    name = service_name(model_name, alias)
    isvc = kserve.V1beta1InferenceService(
        api_version=f"{GROUP}/{VERSION}",
        kind="InferenceService",
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={"app.kubernetes.io/part-of": "zhllama", "zhllama/alias": alias},
            annotations={
                "zhllama/registered-model": model_name,
                "zhllama/model-version": version,
                "zhllama/storage-uri": storage_uri,
            },
        ),
        spec=kserve.V1beta1InferenceServiceSpec(
            predictor=kserve.V1beta1PredictorSpec(
                service_account_name=service_account,
                min_replicas=1,
                model=kserve.V1beta1ModelSpec(
                    name="kserve-container",
                    model_format=kserve.V1beta1ModelFormat(name="huggingface"),
                    storage_uri=storage_uri,
                    # The Hugging Face runtime's own server (not vLLM: no GPU assumed); its OpenAI
                    # routes are /openai/v1/completions and /openai/v1/chat/completions.
                    args=[f"--model_name={name}", "--backend=huggingface", "--task=text_generation", "--dtype=float32"],
                    resources=k8s.V1ResourceRequirements(**RESOURCES),
                ),
            )
        ),
    )
    manifest = kserve.ApiClient().sanitize_for_serialization(isvc)
    validate(manifest)
    return manifest


def validate(manifest: dict[str, Any]) -> None:
    """Every key of ``manifest`` is a field of the kserve SDK's model (or the Kubernetes model it
    nests) at that place, of the declared type, and the predictor is given; else DeployError
    naming the path."""
    if not isinstance(manifest.get("spec", {}).get("predictor"), dict):
        raise DeployError("InferenceService.spec.predictor: required")
    _check_model(manifest, "V1beta1InferenceService", "InferenceService")


_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object, "datetime": str}


def _model_class(name: str) -> type:
    import kserve.models
    from kubernetes.client import models as k8s_models

    klass = getattr(kserve.models, name, None) or getattr(k8s_models, name, None)
    if klass is None:
        raise DeployError(f"no kserve or Kubernetes model named {name}")
    return klass


def _check_model(value: Any, type_name: str, where: str) -> None:
    if not isinstance(value, dict):
        raise DeployError(f"{where}: expected an object ({type_name}), got {type(value).__name__}")
    klass = _model_class(type_name)
    fields = {json_key: klass.openapi_types[attr] for attr, json_key in klass.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise DeployError(f"{where}.{key}: not a field of {type_name} (known: {', '.join(sorted(fields))})")
        _check_value(item, fields[key], f"{where}.{key}")


def _check_value(value: Any, type_name: str, where: str) -> None:
    if value is None:
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise DeployError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_value(item, type_name[5:-1], f"{where}[{i}]")
    elif type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise DeployError(f"{where}: expected a map, got {type(value).__name__}")
        for key, item in value.items():
            _check_value(item, type_name.split(", ", 1)[1][:-1], f"{where}.{key}")
    elif type_name in _SCALARS:
        if not isinstance(value, _SCALARS[type_name]) or (type_name != "bool" and isinstance(value, bool)):
            raise DeployError(f"{where}: expected {type_name}, got {value!r}")
    else:
        _check_model(value, type_name, where)


def to_yaml(manifest: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)


def apply(manifest: dict[str, Any]) -> dict[str, str]:
    """Create the InferenceService, or replace the one of that name (the alias moved). Needs
    the Role in deploy/kserve/rbac.yaml; credentials from the kube config or the pod's account."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.rest import ApiException

    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    api = k8s.CustomObjectsApi()
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        return {"namespace": namespace, "name": name, "action": "created"}
    except ApiException as err:
        if err.status != 409:
            raise DeployError(f"creating InferenceService {namespace}/{name}: {err.status} {err.reason}") from None
    current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, manifest)
    return {"namespace": namespace, "name": name, "action": "replaced"}

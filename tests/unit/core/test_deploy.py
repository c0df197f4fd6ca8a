"""The KServe manifest `zhllama deploy` renders, checked against the kserve SDK's models, and
the RBAC the deploy needs, checked against the Kubernetes models (no cluster, no services)."""

import copy

import pytest
import yaml

from zhllama.core import deploy
from zhllama.core.settings import PROJECT_ROOT

STORAGE = "s3://mlflow/1/models/m-0123/artifacts/artifacts/model"


@pytest.fixture()
def manifest() -> dict:
    return deploy.render("zhllama-chinese-alpaca", "champion", "3", STORAGE, "team-a", "zhllama-serving")


def test_the_manifest_serves_the_versions_folder_with_the_hugging_face_runtime(manifest) -> None:
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "zhllama-chinese-alpaca-champion"
    predictor = manifest["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "zhllama-serving"  # credentials by name only
    assert predictor["model"]["storageUri"] == STORAGE
    assert predictor["model"]["modelFormat"] == {"name": "huggingface"}
    assert manifest["metadata"]["annotations"]["zhllama/model-version"] == "3"
    deploy.validate(yaml.safe_load(deploy.to_yaml(manifest)))  # what --dry-run prints reads back valid


BREAKAGES = {
    "misspelt field": (
        ("spec", "predictor", "model"),
        "storageURI",
        STORAGE,
        "storageURI: not a field of V1beta1ModelSpec",
    ),
    "list for a map": (("spec", "predictor", "model", "resources"), "limits", ["4"], "limits: expected a map"),
    "string for an int": (("spec", "predictor"), "minReplicas", "1", "minReplicas: expected int"),
    "unknown top-level": ((), "specs", {}, "specs: not a field of V1beta1InferenceService"),
}


@pytest.mark.parametrize("case", list(BREAKAGES), ids=list(BREAKAGES))
def test_a_broken_manifest_is_refused_naming_the_path(manifest, case) -> None:
    path, key, value, message = BREAKAGES[case]
    broken = copy.deepcopy(manifest)
    node = broken
    for part in path:
        node = node[part]
    node[key] = value
    with pytest.raises(deploy.DeployError, match=message):
        deploy.validate(broken)


def test_no_predictor_is_refused(manifest) -> None:
    del manifest["spec"]["predictor"]
    with pytest.raises(deploy.DeployError, match="spec.predictor: required"):
        deploy.validate(manifest)


@pytest.mark.parametrize(
    ("model", "alias", "name"),
    [
        ("zhllama-chinese-alpaca", "champion", "zhllama-chinese-alpaca-champion"),
        ("My_Model.v2", "x", "my-model-v2-x"),
        ("7b", "a", "m-7b-a"),
    ],
)
def test_service_names_are_dns_labels(model, alias, name) -> None:
    assert deploy.service_name(model, alias) == name


def _k8s(doc: dict):
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(doc, f"V1{doc['kind']}")


def test_the_rbac_manifest_grants_what_apply_calls() -> None:
    docs = list(yaml.safe_load_all((PROJECT_ROOT / "deploy" / "kserve" / "rbac.yaml").read_text()))
    role = _k8s(next(d for d in docs if d["kind"] == "Role"))
    binding = _k8s(next(d for d in docs if d["kind"] == "RoleBinding"))
    assert binding.role_ref.name == role.metadata.name and binding.role_ref.kind == "Role"
    granted = {
        (group, resource, verb)
        for rule in role.rules
        for group in rule.api_groups
        for resource in rule.resources
        for verb in rule.verbs
    }
    # deploy.apply: create, and on a conflict get + replace (an update)
    for verb in ("create", "get", "update"):
        assert (deploy.GROUP, deploy.PLURAL, verb) in granted
    account = _k8s(yaml.safe_load((PROJECT_ROOT / "deploy" / "kserve" / "serving-account.yaml").read_text()))
    assert account.metadata.name == "zhllama-serving" and [s.name for s in account.secrets] == ["zhllama-s3"]

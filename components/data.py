"""Materialise the DVC-tracked data at a revision and validate it (zhllama.steps.data)."""

from components._factory import make_component, stage_parameters
from components.images import IMAGE_CPU

data = make_component(
    "data",
    "data/ at data_revision (empty: the image's checkout), checked against data.dvc and validated.",
    IMAGE_CPU,
    {"dataset": "Output[Dataset]", "metrics": "Output[Metrics]"},
    stage_parameters(extra=[("data_revision", str, ""), ("data_repo", str, ""), ("data_md5", str, "")]),
    """
report = steps.data(dataset.path, data_revision, data_repo, data_md5, locals())
steps.log_kfp_metrics(metrics, report)
dataset.metadata["dvc_md5"] = report["md5"]
return report["md5"]
""",
    returns="str",
)

"""data/ at data_revision (empty: the image's checkout), checked against data.dvc and validated.

Written by `make components` from zhllama/recipes/chinese_llama_alpaca/stages.py (the stage table)
and the config dataclasses; edit those, not this file. tests/components/test_generated.py
fails when it differs from what they give.
"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import IMAGE_CPU


def data(
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "zhllama",
    data_revision: str = "",
    data_repo: str = "",
    data_md5: str = "",
) -> str:
    """data/ at data_revision (empty: the image's checkout), checked against data.dvc and validated."""
    from zhllama.recipes.chinese_llama_alpaca import launchers

    return launchers.data(
        dataset,
        metrics,
        data_revision=data_revision,
        data_repo=data_repo,
        data_md5=data_md5,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_experiment=mlflow_experiment,
    )


data_cpu = dsl.component(base_image=IMAGE_CPU, install_kfp_package=False)(data)

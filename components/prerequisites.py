"""Cheap checks before anything trains (zhllama.steps.check_prerequisites): every stage's
parameters build a valid config, the MLflow server answers, the promotion rule names metrics
that evaluation produces. Takes every pipeline parameter, so a bad one fails in seconds."""

from components._factory import make_component
from components.images import IMAGE_CPU
from pipelines.parameters import pipeline_parameters

prerequisites = make_component(
    "prerequisites",
    "Fails in seconds naming the bad parameter; returns the tracking URI in use.",
    IMAGE_CPU,
    {},
    pipeline_parameters(),
    'return steps.check_prerequisites(locals())["tracking_uri"]',
    returns="str",
)

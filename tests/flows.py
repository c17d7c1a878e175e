"""The flows in flows/ as importable functions for the tests (the library never imports flows/)."""

from flows.compare import compare_models  # noqa: F401
from flows.full_pipeline import PipelineResult, run_pipeline  # noqa: F401
from flows.reembed import reembed  # noqa: F401

"""The flows in flows/ as importable functions for the tests (the library never imports flows/)."""

from learn.pipeline import run_pipeline  # noqa: F401

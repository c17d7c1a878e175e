import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted models and content stores: $LEARN_TEST_CACHE (kept between runs) or a per-session dir."""
    env = os.environ.get("LEARN_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("learn-cache")


@pytest.fixture
def tiny_cfg(tmp_path, model_cache):
    """conf/tiny.yaml with every output (runs, content store, MLflow store and artifacts) under tmp_path."""
    from learn.config import load_config

    def make(*overrides):
        return load_config(Path(__file__).resolve().parents[1] / "conf/tiny.yaml", [
            f"output_dir={tmp_path / 'runs'}", f"embed.cache_dir={model_cache}",
            f"embed.store={tmp_path / 'content.parquet'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}", *overrides])
    return make

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted models and content stores: $LEARN_TEST_CACHE (kept between runs) or a per-session dir."""
    env = os.environ.get("LEARN_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("learn-cache")


def tiny_config(root: Path, model_cache: Path, *overrides: str):
    """conf/tiny.yaml with every output (runs, content store, MLflow store and artifacts) under root."""
    from learn.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "conf/tiny.yaml", [
        f"output_dir={root / 'runs'}", f"embed.cache_dir={model_cache}", f"embed.store={root / 'content.parquet'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_location={root / 'artifacts'}",
        *overrides])


@pytest.fixture
def tiny_cfg(tmp_path, model_cache):
    """conf/tiny.yaml with every output (runs, content store, MLflow store and artifacts) under tmp_path."""
    return lambda *overrides: tiny_config(tmp_path, model_cache, *overrides)


@pytest.fixture(scope="session")
def demo_store(model_cache) -> str:
    """One content store for every run over conf/tiny.yaml's demo that does not test embedding itself:
    pass ``f"embed.store={demo_store}"``. Vectors are keyed by item, text hash and encoder id, so the
    first run fills it and later runs (and sessions, under $LEARN_TEST_CACHE) only read it."""
    return str(model_cache / "content" / "tiny-demo.parquet")

@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance shared by every Ray test of the session (Ray is slow to start)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    if ray.is_initialized():
        yield ray
        return
    # Ray Train's controller polls its workers every 2 s by default: poll faster for tiny runs
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    from learn.serve import use_serve_ray_env
    from learn.serve.loopback import use_free_serve_ports

    use_serve_ray_env()  # the Serve tests run in the mode flows/serve.py starts Ray in
    use_free_serve_ports()  # and leave Ray's fixed ports to what else runs on the machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved

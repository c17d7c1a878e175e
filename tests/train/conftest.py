import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for every Ray test of the session (Ray is slow to start)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    if ray.is_initialized():
        yield ray
        return
    # Ray Train's controller polls its workers every 2 s by default: poll faster for tiny runs
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance shared by every Ray test of the session (Ray starts slowly)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()

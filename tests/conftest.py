import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted models and content stores: $LEARN_TEST_CACHE (kept between runs) or a per-session dir."""
    env = os.environ.get("LEARN_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("learn-cache")

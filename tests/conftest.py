"""Test configuration: hypothesis profiles and shared fixtures.

Profiles: "ci" (derandomized, no deadline; chosen when the CI environment variable is set) and
"dev" (random, no deadline). Select one explicitly with HYPOTHESIS_PROFILE=name.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's data cache out of the user's home folder."""
    monkeypatch.setenv("REFNET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "refnet-cache"))

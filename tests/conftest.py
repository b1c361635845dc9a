"""Shared fixtures. Tests import the installed `membrain` (make test installs it with pip)."""
from __future__ import annotations

import os

import pytest

from hypothesis import settings

# Property tests must stay inside CI's time budget on 2 cores.
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(int(os.environ.get("MEMBRAIN_TEST_SEED", "1234")))

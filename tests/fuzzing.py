"""Hypothesis profiles of the fuzz tests: a fast one in the default suite, a long one on request.

``NVCIM_FUZZ=long .venv/bin/python -m pytest -q -s tests/test_fuzz_image.py tests/test_serve.py``
runs the long profile (docs/reliability.md has its figures). Examples are derandomized:
the same run finds the same inputs, and nothing is stored between runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("NVCIM_FUZZ") == "long"
_COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nvcim-fast", max_examples=40, **_COMMON)
settings.register_profile("nvcim-long", max_examples=4000, **_COMMON)


def fuzz(fast: int | None = None, long: int | None = None) -> settings:
    """The profile this run asks for, with its example count for one test (fewer where each is costly)."""
    profile = settings.get_profile("nvcim-long" if LONG else "nvcim-fast")
    count = long if LONG else fast
    return settings(profile, max_examples=count) if count else profile

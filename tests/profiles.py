"""The hypothesis profiles, and how many examples the QEMU-heavy properties run under each.

``ci`` (``CI=true``): derandomized, the same examples on every run. ``dev`` (the
default elsewhere): randomized, hypothesis's 100 examples. ``long``
(``HYPOTHESIS_PROFILE=long``): randomized, 2,000 examples, twenty times as many.
Properties and state machines whose examples each build images with QEMU run fewer
than the profile's count, through :func:`examples`, and scale with it, so that the
long run is longer for them too.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def load() -> None:
    """Register the profiles and load the one the environment names (conftest calls it)."""
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", deadline=None, max_examples=2000,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


BASE_EXAMPLES = 100
"""The examples of the ``ci`` and ``dev`` profiles (hypothesis's default)."""


def examples(at_base: int) -> int:
    """``at_base`` examples under the ``ci`` and ``dev`` profiles, proportionally more
    under a profile with more (``long``: twenty times as many), never fewer."""
    default = settings.default.max_examples if settings.default is not None else BASE_EXAMPLES
    return max(at_base, at_base * default // BASE_EXAMPLES)

"""pytest hooks: test classes with ``slow = True`` get the ``slow`` marker.

trial ignores this file (and runs every test); under pytest,
``-m "not slow"`` leaves out the long black-box reliability tests.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item.cls, "slow", False):
            item.add_marker(pytest.mark.slow)

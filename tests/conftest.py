"""Shared test set-up: the out-of-tree toy method (`tests/plugins/`) is installed for the whole session.

`tests/plugins/` holds a module and its `.dist-info` with a `vidistill.methods` entry point, the way
`pip install` leaves a plugin package. Putting the folder on `sys.path` before any test module is
collected makes `list_methods()` (and `list_models()`) include `toy` / `toy_composite`, so every test
parametrized over the registries covers a method that vidistill itself does not ship.
"""

from __future__ import annotations

import sys
from pathlib import Path

PLUGINS = Path(__file__).with_name("plugins")
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """The cluster rehearsal runs last: it is the longest test and starts PostgreSQL, MLflow and a predictor,
    and the two-process SAKD test (torchrun, gloo) that sorts after it hung in two full runs that ran the
    rehearsal first, while it passed alone and after it in another process (not understood yet; see the
    session note on issue 25)."""
    items.sort(key=lambda item: item.nodeid.endswith("test_rehearsal.py::test_cluster_rehearsal"))

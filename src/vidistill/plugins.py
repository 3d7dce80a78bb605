"""Out-of-tree distillation methods and model presets, discovered through package entry points.

A package adds a method without editing vidistill by declaring, in its `pyproject.toml`,

    [project.entry-points."vidistill.methods"]
    mymethod = "my_package.mymethod"          # a module that runs @register_method("mymethod")

and, for model presets of its own (e.g. a composite student), the group `vidistill.models` the same
way. The registries (`list_methods`, `get_method`, `list_models`, `create_model`) import every entry
point of their group once per process, before answering, so a plugin's method appears in `vidistill
methods`, trains with `vidistill distill --method mymethod`, and its student reloads in any later
process (`vidistill export`, `evaluate`, serving) from `model.pt`.
"""

from __future__ import annotations

import importlib.metadata
import warnings

METHODS_GROUP = "vidistill.methods"
MODELS_GROUP = "vidistill.models"

_loaded: set[str] = set()


def load_entry_points(group: str) -> list[str]:
    """Import every entry point of `group` (once per process); returns the names loaded by this call.

    A plugin that fails to import is reported with one warning naming it and the package to fix, and
    skipped: the built-in methods keep working.
    """
    if group in _loaded:
        return []
    _loaded.add(group)
    names = []
    for ep in importlib.metadata.entry_points(group=group):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in methods down with it
            warnings.warn(f"vidistill plugin {ep.name!r} ({ep.value}, entry-point group {group}) failed to load: "
                          f"{type(exc).__name__}: {exc}; fix or uninstall the package that provides it", stacklevel=2)
            continue
        names.append(ep.name)
    return names

"""Objects that settings name by import path (``package.module.name``): a custom aggregation, a
generation backend, the optimizer and callbacks of a parsed config."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from stepwise_lit.errors import SettingError


def import_callable(path: str, setting: str, expected: str = "a class or function") -> Callable:
    """The class or function at ``path``.

    Args:
        path: ``package.module.name``.
        setting: The setting that gave it, which every error message starts with.
        expected: What the setting takes, for the messages (``a function of (scores, mask)``).

    Raises:
        SettingError: For a path without a module, a module that cannot be imported, a missing
            attribute, or one that is not callable.
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise SettingError(f"{setting}: {path!r} is not an import path; give {expected} as package.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SettingError(f"{setting}: cannot import module {module_name!r} of {path!r}: {error}") from None
    if not hasattr(module, attribute):
        raise SettingError(f"{setting}: module {module_name!r} has no attribute {attribute!r}")
    value = getattr(module, attribute)
    if not callable(value):
        raise SettingError(f"{setting}: {path!r} is not callable (type {type(value).__name__}); give {expected}")
    return value

"""Lazy re-exports for the packages' ``__init__`` files (PEP 562 module ``__getattr__``).

Each package names its public API once, as ``{name: submodule}``; a name is imported on
first use. Importing a package then stays cheap (``xmodal.crossmodal.threads`` must not
pull in torch for the CLI's ``--help``), while ``from xmodal.crossmodal import Encoder``
works and ``__all__`` lists exactly what the package offers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(``__all__``, ``__getattr__``, ``__dir__``) for ``package``, whose public names
    live in the submodules ``exports`` maps them to."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    names = sorted(exports)
    return names, __getattr__, lambda: names

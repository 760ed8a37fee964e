"""PEP 562 lazy exports: a package names its public objects up front and imports their modules on first use.

    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"LoRALinear": "nibblora.lora.layers", ...})

This is how `import nibblora`, `import nibblora.models` and `import nibblora.lora` stay free of torch until a
name that needs it is touched (tests/test_startup.py holds that promise). Torch-free names are still imported
eagerly by the package itself; only the heavy ones go in the map.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: `exports` maps each lazy name to the module that defines it;
    `submodules` are subpackages reachable as attributes (`nibblora.quant` after a bare `import nibblora`).

    The first access imports the module and caches the value in `namespace` (the package's globals), so later
    lookups are plain attribute reads. An unknown name raises AttributeError as a module without the hook would.
    """
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")  # the import sets it as an attribute too
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | submodules)

    return __getattr__, __dir__

"""Heavy modules, imported on first use: ``from ..format.lazy import np``.

``qjournal info`` and ``qjournal --help`` should start about as fast as Python itself,
and numpy alone takes longer to import than ``qemu-img info`` takes to run. Every
module of the package names numpy, crc32c and sortedcontainers (and the standard
library's slower imports that only some commands need: concurrent.futures, json,
tempfile) through this module, so none of them is imported until a command
calls into it. Reading a header, its extensions, the snapshot table and a backing
file name needs none of them; bitmap tables (numpy) and a journal sidecar (crc32c,
numpy) load what they use.

The lazy modules behave as the modules themselves: the first attribute read imports
the real one, copies its namespace over and turns the lazy module into a plain module,
so later reads cost what a module attribute costs (a class with ``__getattr__`` would
make every read about three times slower). Type checkers see the real modules (``TYPE_CHECKING``). Module-level
code must not read them (that would import them at once): no ``U = np.uint64``.

This is the one place such a helper lives; it sits in the lowest layer because the
format layer itself uses numpy. Optional packages imported for one command only
(tqdm, zstandard) are imported inside the function that needs them instead.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any


class LazyModule(types.ModuleType):
    """A module that is imported when one of its attributes is first read.

    >>> json = LazyModule("json")
    >>> json.loaded
    False
    >>> json.dumps([1])
    '[1]'
    >>> json.loaded
    True
    """

    loaded: bool = False

    def _load(self) -> types.ModuleType:
        return importlib.import_module(self.__name__)

    def __getattr__(self, attr: str) -> Any:
        # Only called until the first load: the module is a plain one after it.
        # Importing is thread-safe (the import lock); doing the rest twice does no harm.
        real = self._load()
        if not self.loaded:
            self.__dict__.update(vars(real))
            self.loaded = True
            self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from now on
        return getattr(real, attr)


class LazyExtension(LazyModule):
    """A package's C extension (``"crc32c._crc32c"``), loaded on first use without running
    the package's ``__init__``. The ``crc32c`` package's ``__init__`` imports
    ``importlib.metadata`` to look up its own version: 12 ms of every journaled command's
    start, where the extension alone loads in 0.4 ms.

    >>> ext = LazyExtension("crc32c._crc32c")
    >>> hex(ext.crc32c(b"123456789"))
    '0xe3069283'
    """

    def _load(self) -> types.ModuleType:
        name = self.__name__
        if name in sys.modules:
            return sys.modules[name]
        package = importlib.util.find_spec(name.rpartition(".")[0])  # finds, runs nothing
        spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations) \
            if package is not None else None
        if spec is None or spec.loader is None:
            return importlib.import_module(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module       # the package, if imported later, takes this one
        return module


if TYPE_CHECKING:
    import concurrent.futures as futures
    import json
    import tempfile

    import crc32c
    import numpy as np
    import sortedcontainers
else:
    np = LazyModule("numpy")
    crc32c = LazyExtension("crc32c._crc32c")
    sortedcontainers = LazyModule("sortedcontainers")
    futures = LazyModule("concurrent.futures")
    json = LazyModule("json")
    tempfile = LazyModule("tempfile")

__all__ = ["LazyExtension", "LazyModule", "crc32c", "futures", "json", "np", "sortedcontainers", "tempfile"]

"""The optional python packages of the tools/ tests: each test that needs them skips, saying
which is missing (not a module-level skip: that would leave pytest with no test at all, exit 5,
a failure in make test)."""

import importlib

import pytest


def optional(name):
    """The module, or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


NAMES = ("torch", "transformers", "h5py", "numpy")
torch, transformers, h5py, np = (optional(m) for m in NAMES)
MISSING = [m for m, mod in zip(NAMES, (torch, transformers, h5py, np)) if mod is None]
needs_all = pytest.mark.skipif(bool(MISSING), reason=f"optional python packages missing: {', '.join(MISSING)}")

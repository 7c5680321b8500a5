"""The package installs what the source tree holds."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def test_every_subpackage_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        listed = set(tomllib.load(fh)["tool"]["setuptools"]["packages"])
    found = {"fastsal._kernels"}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "fastsal")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found == listed, f"pyproject's packages list differs from the tree: {sorted(found ^ listed)}"


def test_kernels_are_installed_inside_the_package():
    import fastsal._kernels as k

    assert os.path.realpath(os.path.dirname(k.__file__)) == os.path.join(ROOT, "kernels")
    import fastsal

    assert fastsal.__file__ is not None, "fastsal was imported as a namespace package"

"""Python run from the folder holding a clone named ``fastsal/``: ``import fastsal`` finds the
clone's root first. The root's ``__init__.py`` hands over to the installed package, or says
what to do; without it the root would be an empty namespace package."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def beside_a_clone(tmp_path):
    """A folder holding the clone under the name ``fastsal`` (a symlink to this checkout)."""
    try:
        os.symlink(ROOT, tmp_path / "fastsal", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("cannot make a symlink here")
    return tmp_path


def _python(cwd, code, *flags, env=None):
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_installed_package_is_imported(beside_a_clone):
    # the editable install of this checkout (how CI installs fastsal)
    proc = _python(beside_a_clone, "import fastsal, sys; print(fastsal.__file__); print(fastsal.Explainer.__name__); "
                   "import fastsal._kernels; print(sys.modules['fastsal'] is fastsal)")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert os.path.samefile(lines[0], os.path.join(ROOT, "fastsal", "__init__.py"))
    assert lines[1:] == ["Explainer", "True"]


def test_a_package_further_down_sys_path_wins(beside_a_clone, tmp_path_factory):
    # as after a plain `pip install .`: a regular package in a later sys.path entry
    site = tmp_path_factory.mktemp("site")
    (site / "fastsal").mkdir()
    (site / "fastsal" / "__init__.py").write_text("WHERE = 'installed'\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = _python(beside_a_clone, "import fastsal; print(fastsal.WHERE)", "-S", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed"


def test_not_installed_is_a_clear_error(beside_a_clone):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _python(beside_a_clone, "import fastsal", "-S", env=env)  # -S: no site-packages, no editable finder
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "the root of a fastsal clone" in proc.stderr
    assert "pip install" in proc.stderr and "fastsal is not installed" in proc.stderr


def test_the_root_file_does_nothing_under_another_name():
    proc = _python(os.path.dirname(ROOT), f"import importlib.util as u; s = u.spec_from_file_location('clone', "
                   f"{os.path.join(ROOT, '__init__.py')!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
                   "print(sorted(k for k in vars(m) if not k.startswith('__')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

"""Not part of fastsal: the root of a fastsal clone. It exists for one case.

Python run from the folder that *holds* a clone named ``fastsal/`` finds that clone's root
first when it looks for ``fastsal`` (the current folder comes first on ``sys.path``). A
folder without ``__init__.py`` would then be imported as an empty namespace package, and
``fastsal.Explainer`` would fail with a bare AttributeError. With this file the root is a
regular package instead, and importing it as ``fastsal`` hands over to the installed
fastsal (``pip install`` or ``pip install -e``, found further down ``sys.path`` or by the
editable install's finder), or raises an ImportError that says what to do. Imported under
any other name (a tool walking the tree), it does nothing. It is not installed.
"""

if __name__ == "fastsal":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _is_this_file(origin):
        try:
            return origin is not None and _os.path.samefile(origin, __file__)
        except OSError:
            return False

    def _installed_spec():
        """The spec of the installed fastsal, looked for past the entries that lead here."""
        path = [p for p in _sys.path if not _is_this_file(_os.path.join(p or _os.getcwd(), "fastsal", "__init__.py"))]
        spec = _machinery.PathFinder.find_spec("fastsal", path)
        if spec is not None and spec.loader is not None and spec.origin is not None:
            return spec
        for finder in _sys.meta_path:  # an editable install's finder
            if finder is _machinery.PathFinder or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec("fastsal", None)
            except Exception:
                continue
            if spec is not None and spec.loader is not None and spec.origin and not _is_this_file(spec.origin):
                return spec
        return None

    _spec = _installed_spec()
    if _spec is None:
        _root = _os.path.dirname(_os.path.abspath(__file__))
        raise ImportError(
            f"'import fastsal' found {_root}, the root of a fastsal clone, not the package: Python looks in the "
            "current folder first, and fastsal is not installed. Install it (pip install "
            f"\"{_root}[cli]\", or pip install -e \"{_root}[cli]\" to develop), or run Python from inside the clone."
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["fastsal"] = _module  # the import statement returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_module)

"""Triton kernels, shipped as the subpackage `fastdiff.kernels` (setup.py maps kernels/ here).

One module per op, named after it (`fastdiff.kernels.solver_step`). Nothing is imported here:
Triton is optional, and a module is only imported when its backend is used.

The top-level name `kernels` belongs to another installed package (Hugging Face's, which
transformers imports). `python -m ...` from the repository root puts the root first on sys.path,
where this folder would shadow it; imported under that name, this file hands the import on to
the installed package instead (or fails as if the folder were not there).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns whatever sys.modules holds once this file has run.
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)

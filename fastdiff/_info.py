"""`fastdiff.info()`: what was built and which backend each op will use.

    >>> import fastdiff
    >>> print(fastdiff.info())        # readable report
    >>> fastdiff.info()["ops"]["solver_step"]["cpu"]["backend"]
    'cpu'
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
from typing import Any, Dict

import torch


class Info(dict):
    """A plain dict (JSON-friendly) whose str() is a readable report."""

    def __str__(self) -> str:
        ext = self["extension"]
        tri = self["triton"]
        lines = [
            f"fastdiff {self['version']}  torch {self['torch']}  (CUDA build: {self['torch_cuda'] or 'no'}; "
            f"GPU: {self['gpu'] or 'none'})",
        ]
        if ext["loaded"]:
            cuda = (f"yes, {', '.join(ext['cuda_archs'])} (CUDA runtime {ext['cuda_runtime_version']})"
                    if ext["cuda_kernels"] else "no")
            lines += [
                f"compiled extension fastdiff._C: loaded from {ext['path']}",
                f"  CPU kernels: yes ({'OpenMP' if ext['openmp'] else 'no OpenMP'}); CUDA kernels: {cuda}",
                f"  built against torch {ext.get('torch_version') or '?'} with {ext.get('compiler') or '?'}",
            ]
        else:
            lines.append(f"compiled extension fastdiff._C: not available ({ext['error']})")
        if tri["available"]:
            lines.append(f"triton: {tri['version']}"
                         + ("  (TRITON_INTERPRET=1: CPU tensors run in the interpreter)" if tri["interpret"] else ""))
        else:
            lines.append(f"triton: not available ({tri['error']})")
        lines.append('ops: backend chosen by backend="auto" (skipped backends: why)')
        for op, d in self["ops"].items():
            if "error" in d:
                lines.append(f"  {op}: failed to import: {d['error']}")
                continue
            lines.append(f"  {op}  [{' -> '.join(d['backends'])}]")
            for dev in ("cpu", "cuda"):
                plan = d[dev]
                lines.append(f"    {dev.upper()} tensors: {plan['backend']}")
                for name, why in plan["skipped"].items():
                    lines.append(f"      {name}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Info({dict.__repr__(self)})"


def _import_ops() -> Dict[str, str]:
    """Import every fastdiff.ops.<op> module (each registers its dispatcher)."""
    import fastdiff.ops

    errors = {}
    for m in pkgutil.iter_modules(fastdiff.ops.__path__):
        if m.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"fastdiff.ops.{m.name}")
        except Exception as e:  # report, don't hide the rest
            errors[m.name] = f"{type(e).__name__}: {e}"
    return errors


def info() -> Info:
    import fastdiff
    from fastdiff import _ext
    from fastdiff.ops import _dispatch

    errors = _import_ops()

    build = _ext.build_info()
    extension: Dict[str, Any] = {
        "loaded": _ext.available(),
        "error": _ext.LOAD_ERROR,
        "path": getattr(_ext.C, "__file__", None),
        "cuda_kernels": bool(build.get("cuda", False)),
        "cuda_archs": [a for a in str(build.get("cuda_archs", "")).split(",") if a],
        "cuda_runtime_version": build.get("cuda_runtime_version"),
        "openmp": bool(build.get("openmp", False)),
        "torch_version": build.get("torch_version"),
        "compiler": build.get("compiler"),
    }

    triton: Dict[str, Any] = {
        "available": False, "version": None, "error": None,
        "interpret": os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"),
    }
    try:
        import triton as _triton

        triton["available"] = True
        triton["version"] = getattr(_triton, "__version__", None) or importlib.metadata.version("triton")
    except Exception as e:
        triton["error"] = f"{type(e).__name__}: {e}"

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    ops: Dict[str, Any] = {}
    for name, disp in sorted(_dispatch.registered().items()):
        ops[name] = {"backends": list(disp.backends), "cpu": disp.plan("cpu"), "cuda": disp.plan("cuda")}
    for name, err in errors.items():
        ops.setdefault(name, {"error": err})

    return Info(
        version=fastdiff.__version__,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        gpu=gpu,
        extension=extension,
        triton=triton,
        ops=ops,
    )

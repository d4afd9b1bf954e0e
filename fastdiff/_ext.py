"""Loading of the optional compiled extension `fastdiff._C`.

The package works without it (Triton / reference backends). Importing `fastdiff._C` registers
the private ops `torch.ops.fastdiff_C.<op>` with a CPU kernel and, when built with CUDA, a CUDA
kernel. Set FASTDIFF_LOAD_EXT=0 to run as if it were not built (tests of the fallback paths).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

C: Optional[Any] = None
LOAD_ERROR: Optional[str] = None

if os.environ.get("FASTDIFF_LOAD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
    LOAD_ERROR = "not loaded: FASTDIFF_LOAD_EXT=0"
else:
    try:
        from fastdiff import _C as C  # noqa: N812
    except (ImportError, OSError) as e:  # not built, or built against another torch
        C = None
        LOAD_ERROR = f"{type(e).__name__}: {e}"


def available() -> bool:
    return C is not None


def build_info() -> dict:
    """What the extension was built with ({} when it is not loaded)."""
    if C is None:
        return {}
    try:
        return dict(C.build_info())
    except Exception as e:  # pragma: no cover - only with a broken build
        return {"error": repr(e)}


_HAS_KERNEL: dict = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `fastdiff_C::<op>` has a kernel for `dispatch_key` ("CPU" or "CUDA").
    Cached: the extension's registrations do not change once it is loaded."""
    key = (op, dispatch_key)
    hit = _HAS_KERNEL.get(key)
    if hit is not None:
        return hit
    ok = False
    if C is not None:
        try:
            ok = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff_C::{op}", dispatch_key))
        except RuntimeError:  # op not registered
            ok = False
    _HAS_KERNEL[key] = ok
    return ok


def missing_reason(op: str, dispatch_key: str) -> Optional[str]:
    """None when the compiled `op` kernel for `dispatch_key` can run, else why not."""
    if C is None:
        return f"the compiled extension fastdiff._C is not available ({LOAD_ERROR})"
    if not has_kernel(op, dispatch_key):
        if dispatch_key == "CUDA":
            return ("fastdiff._C was built without CUDA kernels (no CUDA toolkit or a CPU-only torch at "
                    "build time, or FASTDIFF_WITH_CUDA=0)")
        return f"fastdiff._C has no {dispatch_key} kernel for {op}"
    return None

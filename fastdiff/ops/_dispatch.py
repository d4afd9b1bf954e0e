"""Backend selection shared by every fastdiff op.

Each op builds one `Dispatcher` from an ordered list of `Provider`s, always in the order
`cuda -> triton -> cpu -> reference` (DESIGN.md section 5), and registers it so that
`fastdiff.info()` can report it:

    DISPATCH = register(Dispatcher("solver_step", [Provider("cuda", supports, run), ...],
                                   example=lambda device_type: ...))
    DISPATCH.select(args, backend)     # -> Provider
    DISPATCH.run(args, backend)        # select + run
    DISPATCH.known(key) / DISPATCH.learn(key, provider)   # validate once, run many (below)

`supports(args)` returns None when the provider can run these arguments, else a short reason
why not (not built, no GPU, Triton missing, wrong device, ...). `backend="auto"` takes the first
provider that supports the arguments; naming a backend forces it, and a forced backend that
cannot run raises `BackendUnavailableError` with the reason -- never a silent fallback.

`args` is whatever object the op passes around (the providers read what they need); the
`example(device_type)` factory returns a stand-in with the attributes `supports` reads, so
that info() can say which backend an op would use on CPU and on CUDA tensors without making
any tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A backend was forced with backend=... but cannot run these inputs."""


@dataclass(frozen=True)
class Provider:
    name: str
    supports: Callable[[Any], Optional[str]]
    run: Callable[[Any], None]


class Dispatcher:
    def __init__(self, op: str, providers: Sequence[Provider],
                 example: Optional[Callable[[str], Any]] = None):
        names = [p.name for p in providers]
        for n in names:
            if n not in BACKENDS:
                raise ValueError(f"{op}: unknown backend {n!r}; backends are {BACKENDS}")
        order = [BACKENDS.index(n) for n in names]
        if order != sorted(order) or len(set(names)) != len(names):
            raise ValueError(f"{op}: providers must follow the order {BACKENDS}, got {names}")
        self.op = op
        self.providers: List[Provider] = list(providers)
        self._by_name: Dict[str, Provider] = {p.name: p for p in providers}
        self.example = example
        self._known: Dict[tuple, Provider] = {}

    @property
    def backends(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    def check_backend_name(self, backend: str) -> None:
        if not isinstance(backend, str) or (backend != AUTO and backend not in self._by_name):
            raise ValueError(
                f"{self.op}: backend must be one of {(AUTO,) + self.backends}, got {backend!r}")

    def explain(self, args: Any) -> List[Tuple[str, Optional[str]]]:
        """[(backend, None if it supports args else the reason)] in priority order."""
        return [(p.name, p.supports(args)) for p in self.providers]

    def select(self, args: Any, backend: str = AUTO) -> Provider:
        self.check_backend_name(backend)
        if backend != AUTO:
            p = self._by_name[backend]
            why = p.supports(args)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend={backend!r} cannot run: {why}")
            return p
        reasons = []
        for p in self.providers:
            why = p.supports(args)
            if why is None:
                return p
            reasons.append(f"{p.name}: {why}")
        raise BackendUnavailableError(f"{self.op}: no backend supports these inputs ({'; '.join(reasons)})")

    def run(self, args: Any, backend: str = AUTO) -> str:
        """Select and run; returns the name of the backend that ran."""
        p = self.select(args, backend)
        p.run(args)
        return p.name

    def known(self, key: tuple) -> Optional[Provider]:
        """The provider chosen for a signature that passed the op's checks before, or None.

        A sampling loop calls an op with the same shapes, strides, dtypes, devices, pointers and
        numbers at every step (or a few sets of them): everything the checks and the backend
        choice read is in `key` (built by the op, ending with `signature_env()`), so a known key
        skips them. Bounded: forgotten when full."""
        return self._known.get(key)

    def learn(self, key: tuple, provider: Provider) -> None:
        if len(self._known) >= KNOWN_SIGNATURES:
            self._known.clear()
        self._known[key] = provider

    def plan(self, device_type: str) -> Dict[str, Any]:
        """What auto would pick for typical inputs on `device_type`, and why the others not."""
        if self.example is None:
            return {"backend": None, "skipped": {}}
        args = self.example(device_type)
        skipped = {}
        chosen = None
        for name, why in self.explain(args):
            if why is None and chosen is None:
                chosen = name
            elif why is not None:
                skipped[name] = why
        return {"backend": chosen, "skipped": skipped}


KNOWN_SIGNATURES = 256
_REGISTRY: Dict[str, Dispatcher] = {}


def register(dispatcher: Dispatcher) -> Dispatcher:
    _REGISTRY[dispatcher.op] = dispatcher
    return dispatcher


def registered() -> Dict[str, Dispatcher]:
    return dict(_REGISTRY)


def import_kernel(name: str):
    """Import the Triton module `fastdiff.kernels.<name>`.

    Installed packages map the top-level kernels/ folder to `fastdiff.kernels` (setup.py). When
    fastdiff is imported straight from a source tree that was never installed, kernels/ sits
    next to fastdiff/ and is mapped here the same way.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    full = f"fastdiff.kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name not in ("fastdiff.kernels", full) or "fastdiff.kernels" in sys.modules:
            raise
    import fastdiff

    src = Path(fastdiff.__file__).resolve().parent.parent / "kernels"
    if not (src / "__init__.py").is_file():
        raise ModuleNotFoundError(f"No module named 'fastdiff.kernels' (and no {src})", name="fastdiff.kernels")
    spec = importlib.util.spec_from_file_location(
        "fastdiff.kernels", src / "__init__.py", submodule_search_locations=[str(src)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastdiff.kernels"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(full)


# --- validate once, run many --------------------------------------------------------------------


# nn.Parameter disables __torch_function__ / __torch_dispatch__: it acts as a plain tensor (the
# fused modules pass their weights as Parameters at every call)
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))


def direct(x, *tensors) -> bool:
    """Whether an op's wrapper may call its implementation straight instead of through torch.ops,
    whose dispatcher round trip back into the Python implementation costs ~15 us a call. Only
    plain eager calls: not traced by torch.compile, no dispatch or function mode (FakeTensorMode,
    an op counter), no functorch transform, plain tensors, Parameters or None, x a plain non-meta
    tensor (the op's checks reject any other tensor not on x's device). Everything else takes
    the registered op (its fake implementation, the modes)."""
    if torch.compiler.is_compiling():  # first: torch.compile must not trace the calls below
        return False
    C = torch._C
    if C._len_torch_dispatch_stack() or C._is_torch_function_mode_enabled() or C._are_functorch_transforms_active():
        return False
    return type(x) is torch.Tensor and set(map(type, tensors)) <= _PLAIN and not x.is_meta


def tensor_key(t) -> Optional[tuple]:
    """What an op's checks read of a tensor (its pointer too: the overlap checks)."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def metadata_key(t) -> Optional[tuple]:
    """`tensor_key` without the pointer: for calls with no overlap to check (the output is new,
    allocated by the op's wrapper), whose tensors sit at new addresses at every call."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def signature_env() -> Optional[str]:
    """What the backend choice reads from the environment (Triton's interpreter mode)."""
    return os.environ.get("TRITON_INTERPRET")


# --- what several ops' checks share ---------------------------------------------------------------


def _span(t: torch.Tensor):
    """[first byte, last byte + 1) that t can address (strides are never negative in torch)."""
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def overlapped_input(out: torch.Tensor, inputs) -> Optional[str]:
    """The name of the first of `inputs` ((name, tensor) pairs) whose address range meets out's,
    or None. For outputs written while other programs still read the inputs (conservative: any
    intersection of the ranges counts)."""
    if out.numel() == 0:
        return None
    os_, oe = _span(out)
    for name, t in inputs:
        if t.numel() == 0:
            continue
        ts, te = _span(t)
        if ts < oe and os_ < te:
            return name
    return None


# --- what every op's providers check -------------------------------------------------------------

_TRITON_ERROR: List[Optional[str]] = []  # cached import result: [None] ok, [msg] missing/broken


def triton_missing() -> Optional[str]:
    """None when Triton imports, else why not (cached)."""
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401

            _TRITON_ERROR.append(None)
        except Exception as e:  # ImportError, or a broken install
            _TRITON_ERROR.append(f"triton is not importable ({type(e).__name__}: {e}); pip install 'fastdiff[triton]'")
    return _TRITON_ERROR[0]


def triton_interpret() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU tensors, interpreted."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unsupported(device_type: str) -> Optional[str]:
    """Why the Triton backend cannot run tensors of `device_type` here, or None."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available (no GPU or no driver)"
    elif device_type == "cpu":
        if not triton_interpret():
            return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1"
    else:
        return f"Triton does not run {device_type} tensors"
    return triton_missing() or triton_mode_mismatch(device_type == "cpu")


def triton_mode_mismatch(interpret: bool) -> Optional[str]:
    """Why Triton cannot run in `interpret` mode in this process, or None. Triton builds its
    standard library (tl.sum, tl.zeros, ...) for one mode when `triton` is first imported, from
    TRITON_INTERPRET at that moment; kernels run in the other mode fail inside the kernel."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    compiled = isinstance(tl.standard.sum, JITFunction)
    if interpret and compiled:
        return ("TRITON_INTERPRET=1 was set after `import triton`: set it before triton (or fastdiff's "
                "Triton backend) is first imported")
    if not interpret and not compiled:
        return ("triton was imported under TRITON_INTERPRET=1, so it cannot compile GPU kernels in this "
                "process: unset TRITON_INTERPRET before the first `import triton`")
    return None

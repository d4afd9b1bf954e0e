"""A stand-in for CUDA streams and CUDA graphs, as strict as a real capture, for testing the
whole-loop graph logic on the CPU. The `fake_graphs` fixture puts it in place of
`torch.cuda.Stream/stream/current_stream/device/CUDAGraph/graph/graph_pool_handle`, so
fastdiff.graphs runs its own warm-up and capture code against it. Every tensor stands for a
device tensor (fastdiff keeps its host-side tables in numpy).

What a real CUDA graph does, and so what this fake does:
* capture records the work of the capture stream (every ATen op and compiled kernel it runs,
  via a TorchDispatchMode) and keeps no Python reference to the recorded code, its closure or
  its tensors. A fastdiff op (a Python dispatcher choosing a backend) is recorded as the kernel
  it chose: a replay runs that kernel, not the dispatch again;
* replay re-executes that work on the same memory: the same storages, offsets, sizes and
  strides, whatever Python objects exist now. Memory allocated during capture belongs to the
  graph (its private pool), so the fake keeps those storages. Memory that existed before the
  capture (static inputs, state, buffers) does not: the fake holds it only weakly, and a replay
  raises `FreedBufferError` if any of it has been freed since, where a real replay would
  silently read and write freed (possibly reused) memory;
* during capture, a host synchronisation or a copy between host and device fails, as on CUDA
  ("operation not permitted when stream is capturing"): `.item()`, `.cpu()`, `.tolist()`,
  `.numpy()`, `.nonzero()`, boolean-mask indexing and other ops whose result shape depends on
  data, printing a tensor,
  `torch.tensor(...)` / `torch.as_tensor(...)` from host data;
* work in the capturing thread on a stream outside the capture (not forked from the capture
  stream with `wait_stream`) fails: it would run once, now, not on replay, with memory from
  outside the graph's pool. A forked stream must be joined back before the capture ends;
* capture_error_mode="global" (torch's default): another thread that allocates, synchronises
  or copies from the host while the capture runs fails, and so does the capture.
  "thread_local" confines the rule to the capturing thread;
* streams: an op that reads or writes memory last written on another stream, which its own
  stream has not waited for (`wait_stream`, `wait_event`, a device synchronisation), raises
  `StreamRaceError`. Each thread starts on the default stream. torch.cuda.graph synchronises
  the device before capturing.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CAPTURING = "operation not permitted when stream is capturing"
aten = torch.ops.aten


class FreedBufferError(RuntimeError):
    """A replay would touch memory that was freed after the capture."""


class StreamRaceError(RuntimeError):
    """An op touches memory another stream wrote, without waiting for that stream."""


_HOST_SYNC = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
              aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
              aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}
# Python-level host transfers: tensor -> host, or host data -> tensor
_HOST_COPY = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__repr__,
              torch.Tensor.__format__, torch.tensor, torch.as_tensor}


def _syncs(func, args) -> bool:
    """Whether the op waits for the device: a scalar read, a result whose shape depends on the
    data, or indexing with a boolean mask (a nonzero inside)."""
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return func in _HOST_SYNC


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _tensors(tree):
    found = []
    tree_map(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, tree)
    return found


class FakeEvent:
    def __init__(self, seen: dict):
        self.seen = seen


class FakeStream:
    """torch.cuda.Stream: counts its ops and remembers how far it has waited for every other stream."""

    _ids = itertools.count()

    def __init__(self, device=None, priority=0):
        self.id = next(self._ids)
        self.ops = 0
        self.seen = {}  # stream -> number of its ops this one has waited for

    def __repr__(self):
        return f"<stream {self.id}>"

    def _clock(self) -> dict:
        return {**self.seen, self: self.ops}

    def _wait(self, clock: dict) -> None:
        for s, n in clock.items():
            if s is not self:
                self.seen[s] = max(self.seen.get(s, 0), n)

    def wait_stream(self, other: "FakeStream") -> None:
        DEVICE.fork_or_join(self, other)
        self._wait(other._clock())

    def record_event(self) -> FakeEvent:
        return FakeEvent(self._clock())

    def wait_event(self, event: FakeEvent) -> None:
        self._wait(event.seen)

    def synchronize(self) -> None:
        pass


class _Capture:
    def __init__(self, stream: FakeStream, mode: str):
        if mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"capture_error_mode: expected 'global', 'thread_local' or 'relaxed', got {mode!r}")
        self.thread, self.stream, self.mode = threading.get_ident(), stream, mode
        self.streams = {stream}  # the capture stream and the streams forked from it
        self.invalidated = None  # why another thread broke the capture

    def forbids(self) -> bool:
        """Whether the current thread may not synchronise, allocate or copy from the host now."""
        return threading.get_ident() == self.thread or self.mode == "global"

    def refuse(self, what: str):
        if threading.get_ident() != self.thread:
            self.invalidated = f"{what} in another thread during a capture in capture_error_mode='global'"
            return RuntimeError(f"{what}: {CAPTURING} (another thread captures in capture_error_mode='global')")
        return RuntimeError(f"{what}: {CAPTURING}")


class _Device:
    """The fake device: streams, the memory each last wrote, the capture under way."""

    def __init__(self):
        self.default = FakeStream()
        self.local = threading.local()
        self.writer = {}  # storage key -> (stream, its op count) of the last write
        self.capture = None
        self.lock = threading.Lock()

    def current(self) -> FakeStream:
        return getattr(self.local, "stream", self.default)

    def synchronize(self) -> None:
        with self.lock:
            self.writer.clear()

    def fork_or_join(self, waiter: FakeStream, other: FakeStream) -> None:
        cap = self.capture
        if cap is not None and other in cap.streams and waiter not in cap.streams:
            cap.streams.add(waiter)

    def touch(self, func, read, written, fresh) -> None:
        """Record one op on the current stream; StreamRaceError if it races another stream.
        `fresh`: its new allocations (the caching allocator gives a stream only memory freed on
        that stream, so reused memory races nothing)."""
        s = self.current()
        with self.lock:
            s.ops += 1
            new = {_storage_key(t) for t in fresh}
            for t in read + written:
                if _storage_key(t) in new:
                    continue
                last = self.writer.get(_storage_key(t))
                if last is not None and last[0] is not s and s.seen.get(last[0], 0) < last[1]:
                    raise StreamRaceError(f"{func} on {s} touches memory that {last[0]} wrote, without waiting for "
                                          f"{last[0]} (wait_stream / wait_event)")
            for t in written:
                self.writer[_storage_key(t)] = (s, s.ops)


DEVICE = _Device()


def _written(func, args, kwargs, out) -> list:
    """The tensors an op writes: its outputs and its mutated arguments (by its schema)."""
    written = _tensors(out)
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = kwargs.get(a.name, args[i] if i < len(args) else None)
            written += _tensors(v)
    return written


class _Observer(TorchDispatchMode):
    """Active in every thread while the fake is in place: stream order, and the capture rules
    for threads other than the capturing one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = DEVICE.capture
        if cap is not None and cap.forbids() and _syncs(func, args):
            raise cap.refuse(str(func))
        inputs = _tensors((args, kwargs))
        before = {_storage_key(t) for t in inputs}
        out = func(*args, **kwargs)
        cap = DEVICE.capture
        if cap is not None and threading.get_ident() == cap.thread and DEVICE.current() in cap.streams:
            DEVICE.current().ops += 1  # recorded, not run on the device: its replays touch the memory
            return out
        fresh = [t for t in _tensors(out) if _storage_key(t) not in before]
        if cap is not None and cap.forbids() and fresh:
            raise cap.refuse(f"{func} allocates")
        DEVICE.touch(func, inputs, _written(func, args, kwargs, out), fresh)
        return out


class _HostCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        cap = DEVICE.capture
        if cap is not None and cap.forbids() and func in _HOST_COPY:
            owner = "torch" if func in (torch.tensor, torch.as_tensor) else "Tensor"
            raise cap.refuse(f"{owner}.{func.__name__} (a copy between host and device)")
        return func(*args, **(kwargs or {}))


class _Ref:
    """Where a tensor lived at capture: its storage (strongly or weakly held) and its view."""

    def __init__(self, t: torch.Tensor, owned: dict, seen: dict):
        key = _storage_key(t)
        st = t.untyped_storage()
        if key not in seen:  # first sight: created during the capture only if an op made it
            seen[key] = st if key in owned else weakref.ref(st)
        self.storage, self.key = seen[key], key
        self.view = (t.dtype, t.device, t.storage_offset(), tuple(t.shape), t.stride())

    def tensor(self) -> torch.Tensor:
        st = self.storage() if isinstance(self.storage, weakref.ref) else self.storage
        if st is None:
            raise FreedBufferError(f"replay touches a buffer freed after capture (storage at {self.key[0]:#x}, "
                                   f"{self.key[1]} bytes): nothing owns it any more")
        dtype, device, offset, shape, stride = self.view
        return torch.empty(0, dtype=dtype, device=device).set_(st, offset, shape, stride)


class _Recorder(TorchDispatchMode):
    def __init__(self, capture: _Capture):
        super().__init__()
        self.capture = capture
        self.tape, self.owned, self.seen = [], {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args):
            raise self.capture.refuse(str(func))
        stream = DEVICE.current()
        if stream not in self.capture.streams:
            raise RuntimeError(f"{func} runs on {stream}, outside the capture (not forked from the capture stream "
                               "with wait_stream): it would run once, now, not on replay, with memory from outside "
                               "the graph's pool")
        if func.namespace == "fastdiff":  # a Python dispatcher: record the kernel it chooses
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        refs_in = tree_map(self._ref, (args, kwargs))  # inputs first: pre-existing memory is weak
        out = func(*args, **kwargs)
        for t in _tensors(out):
            key = _storage_key(t)
            if key not in self.seen:  # a fresh allocation: the graph's pool owns it
                self.owned[key] = t.untyped_storage()
        self.tape.append((func, refs_in, tree_map(self._ref, out)))
        return out

    def _ref(self, v):
        return _Ref(v, self.owned, self.seen) if isinstance(v, torch.Tensor) else v


class FakeCUDAGraph:
    """torch.cuda.CUDAGraph: capture_begin/capture_end (through `fake_graph`), replay."""

    def capture_begin(self, stream: FakeStream, capture_error_mode: str) -> None:
        if DEVICE.capture is not None:
            raise RuntimeError("a capture is already under way on this device")
        DEVICE.capture = _Capture(stream, capture_error_mode)
        self._modes = [_HostCopies(), _Recorder(DEVICE.capture)]
        for m in self._modes:
            m.__enter__()

    def capture_end(self) -> None:
        for m in reversed(self._modes):
            m.__exit__(None, None, None)
        cap, DEVICE.capture = DEVICE.capture, None
        self.tape = self._modes[1].tape
        del self._modes
        if cap.invalidated:
            raise RuntimeError(f"capture invalidated: {cap.invalidated}")
        unjoined = [s for s in cap.streams if s is not cap.stream and s.ops > cap.stream.seen.get(s, 0)]
        if unjoined:
            raise RuntimeError(f"capture ended with work on {unjoined} not joined back into the capture stream")

    def capture(self, run) -> "FakeCUDAGraph":
        with fake_graph(self):
            run()
        return self

    def replay(self) -> None:
        materialise = lambda v: v.tensor() if isinstance(v, _Ref) else v  # noqa: E731
        for func, refs_in, refs_out in self.tape:
            args, kwargs = tree_map(materialise, refs_in)
            out = func(*args, **kwargs)
            # results land where the capture put them (later ops read them there)
            for got, ref in zip(_tensors(out), _tensors(tree_map(materialise, refs_out))):
                if got.data_ptr() != ref.data_ptr() or got.stride() != ref.stride():
                    ref.copy_(got)


@contextlib.contextmanager
def fake_stream(stream: FakeStream):
    """torch.cuda.stream"""
    before = DEVICE.current()
    DEVICE.local.stream = stream
    try:
        yield
    finally:
        DEVICE.local.stream = before


@contextlib.contextmanager
def fake_graph(cuda_graph: FakeCUDAGraph, pool=None, stream=None, capture_error_mode="global"):
    """torch.cuda.graph: synchronise the device, then capture on `stream` (a new side stream if None)."""
    DEVICE.synchronize()
    stream = stream or FakeStream()
    with fake_stream(stream):
        cuda_graph.capture_begin(stream, capture_error_mode)
        try:
            yield cuda_graph
        finally:
            cuda_graph.capture_end()


@contextlib.contextmanager
def observed():
    """The fake device's rules in this thread (the fixture does this for the test's threads)."""
    with _HostCopies(), _Observer():
        yield


@pytest.fixture
def fake_graphs(monkeypatch):
    """torch.cuda's streams and graphs replaced by the fake (for the test and every thread it
    starts) -> fastdiff.graphs (import this fixture into a test module to use it)."""
    import fastdiff.graphs as G

    global DEVICE
    DEVICE = _Device()
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "stream", fake_stream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: DEVICE.current())
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(cuda, "graph", fake_graph)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: ("pool", next(FakeStream._ids)))
    monkeypatch.setattr(cuda, "is_current_stream_capturing",
                        lambda: DEVICE.capture is not None and DEVICE.current() in DEVICE.capture.streams)
    run = threading.Thread.run

    def observed_run(self):
        with observed():
            run(self)

    monkeypatch.setattr(threading.Thread, "run", observed_run)
    G.CACHE.clear()
    with observed():
        yield G
    G.CACHE.clear()


def graphed(G, sampler, model, noise, **kw):
    """`fastdiff.graphs.sample_graphed` with sample()'s defaults, for the fake graph on CPU tensors."""
    kw.setdefault("generator", None)
    return G.sample_graphed(sampler, model, noise, guidance_scale=kw.pop("guidance_scale", 1.0),
                            cond=kw.pop("cond", None), uncond=kw.pop("uncond", None), cfg=kw.pop("cfg", "batched"),
                            model_dtype=None, mode=kw.pop("mode", True), **kw)

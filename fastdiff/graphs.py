"""One CUDA graph for the whole sampling loop.

`sample(..., cuda_graph=True)` records every model call and every `solver_step` of all N
steps (CFG included) into one CUDA graph, then replays it with a single launch:

* Static inputs: the state buffer (the initial noise is copied in), copies of the tensor
  conditioning inputs, and the guidance scale as a 0-d device tensor (the fused step reads
  it at replay time). New noise, new conditioning or a new guidance scale are copied into
  them before each replay: none of them needs a new capture.
* SDE / ancestral noise: one static buffer holds every noise draw of the loop (one per noisy
  table row, plus Heun's initial churn: `SolverTable.noise_draws`); before each
  replay it is refilled with `normal_(generator=...)` from the caller's generator (or the
  default one), one launch. Same generator state, same samples; a new state, new noise. With a
  list of per-image generators, image b's noise for all steps is drawn from generator b alone.
  (So noise is drawn differently from the eager loop, which draws step by step.) The buffer
  costs noise draws x latent size; over `max_noise_bytes` it is an error.
* The result is copied out of the state buffer: a later replay never overwrites a tensor a
  caller holds.
* Cache: graphs are keyed by everything that changes what is recorded (the model object, the
  plan, shapes, dtypes, layout, device, CFG mode, conditioning structure, model dtype, and the
  grad / inference / autocast modes), at most `max_graphs` of them (least recently used
  evicted), all allocating from one shared memory pool. A CUDA graph keeps no Python
  references, so each cache entry owns every tensor the recorded work reads or writes: the
  state, the history ring buffer, the model times, the static conditioning, guidance and noise
  (and the model, whose parameters the graph reads in place: in-place weight updates are seen,
  replaced parameter tensors need `fastdiff.clear_graphs()`).
* Capture runs on a side stream of the tensors' own device, after one warm-up run there, in
  capture_error_mode="thread_local": only the capturing thread is held to the capture's rules,
  so other threads may sample eagerly, allocate or synchronise meanwhile.
* Threads: a lock makes capture and the host side of a replay atomic; on the GPU every replay
  (its static copies in, the graph, the result copied out) waits for the previous one, on
  whatever stream it was issued, so replays from threads on different streams never overlap
  (they share static buffers and the memory pool).
* A model compiled with `torch.compile(mode="reduce-overhead")` records CUDA graphs of its own,
  which cannot nest in ours: `GraphCaptureError` (or the eager loop under "auto").
* A model that cannot be captured (host synchronisation such as `.item()`, data-dependent
  shapes, CPU work) raises `GraphCaptureError` naming the cause; with `cuda_graph="auto"`
  the eager fused loop runs instead, with a warning.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from fastdiff.guidance import ModelCaller, new_slots
from fastdiff.noise import randn
from fastdiff.profiling import nvtx_range


class GraphCaptureError(RuntimeError):
    """The sampling loop could not be recorded into a CUDA graph."""


CUDA_GRAPH_MODES = (False, True, "auto")


def _tensor_meta(v: Any):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device, v.stride())
    try:
        hash(v)
        return ("value", v)
    except TypeError:
        return ("object", id(v))


def _modes(device: torch.device) -> tuple:
    """Thread-local modes that change what is recorded or which tensors may be written later:
    a graph recorded under inference_mode owns inference tensors that normal mode cannot update."""
    autocast = torch.is_autocast_enabled(device.type)
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
            torch.get_autocast_dtype(device.type) if autocast else None)


def graph_key(sampler, model, x: torch.Tensor, caller: ModelCaller) -> tuple:
    """Everything that changes what the graph records; the guidance scale and tensor values do not."""
    cond = tuple(sorted((k, _tensor_meta(v)) for k, v in caller.cond.items()))
    uncond = tuple(sorted((k, _tensor_meta(v)) for k, v in caller.uncond.items())) if caller.guided else ()
    return (id(model), sampler.signature, tuple(x.shape), x.dtype, x.device, x.stride(), caller.mode,
            caller.model_dtype, cond, uncond, _modes(x.device))


def nested_graph_reason(model) -> Optional[str]:
    """Why `model` would record CUDA graphs of its own inside ours (torch.compile with
    mode="reduce-overhead" or the inductor option triton.cudagraphs), or None."""
    parts = model.modules() if isinstance(model, torch.nn.Module) else (model,)
    for part in parts:
        config = getattr(part, "get_compiler_config", None)
        if callable(config) and (config() or {}).get("triton.cudagraphs"):
            name = type(getattr(part, "_orig_mod", part)).__name__
            return (f"{name} is compiled with CUDA graphs of its own (torch.compile mode='reduce-overhead' or "
                    "triton.cudagraphs), which cannot nest in the sampling loop's graph: compile it with "
                    "mode='max-autotune-no-cudagraphs' or 'default', or sample with cuda_graph=False")
    return None


@dataclass
class _Recorded:
    """A recorded loop and every tensor it reads or writes: the graph itself holds none."""

    graph: Any
    x: torch.Tensor
    history: Optional[torch.Tensor]
    times: torch.Tensor  # the model times the recorded calls read
    caller: ModelCaller  # its static cond/uncond copies, and the model: its parameters (read in place)
    # stay alive, and its id (in the key) cannot be reused by another model while the graph lives
    guidance: Optional[torch.Tensor]  # the CFG scale the recorded kernels read (None: no CFG)
    noise: Optional[torch.Tensor]

    def replay(self, noise: torch.Tensor, cond, uncond, guidance_scale: float, generator) -> torch.Tensor:
        _after_previous_replay(self.x.device)
        self.x.copy_(noise)
        for static, new in ((self.caller.cond, cond), (self.caller.uncond, uncond)):
            for k, v in (new or {}).items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
        if self.guidance is not None:
            self.guidance.fill_(guidance_scale)
        if isinstance(generator, (list, tuple)) and self.noise is not None:  # per-image: image-major draws
            self.noise.copy_(randn((self.x.shape[0], self.noise.shape[0]) + tuple(self.x.shape[1:]), generator,
                                   self.x.device).transpose(0, 1))
        elif self.noise is not None:
            self.noise.normal_(generator=generator)
        with nvtx_range("fastdiff/graph_replay"):
            self.graph.replay()
        out = self.x.clone()
        _mark_replay_done(self.x.device)
        return out


# The event recorded after the last replay (its result copied out), per device. Each replay
# first makes its own stream wait for it: replays from any thread or stream run one at a time
# on the GPU, with no host synchronisation.
_LAST_REPLAY: Dict[torch.device, Any] = {}


def _after_previous_replay(device: torch.device) -> None:
    done = _LAST_REPLAY.get(device)
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)


def _mark_replay_done(device: torch.device) -> None:
    if device.type == "cuda":
        _LAST_REPLAY[device] = torch.cuda.current_stream(device).record_event()


class GraphCache:
    """A bounded LRU of recorded sampling loops sharing one CUDA memory pool."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, _Recorded]" = OrderedDict()
        self.lock = threading.RLock()
        self._pool = None
        self.captures = 0
        self.replays = 0

    @property
    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def get(self, key) -> Optional[_Recorded]:
        rec = self._graphs.get(key)
        if rec is not None:
            self._graphs.move_to_end(key)
        return rec

    def put(self, key, rec: _Recorded) -> None:
        self._graphs[key] = rec
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self._graphs.clear()
            self._pool = None
            self.captures = self.replays = 0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    def __len__(self) -> int:
        return len(self._graphs)

    def stats(self) -> Dict[str, int]:
        return {"cached": len(self._graphs), "captures": self.captures, "replays": self.replays,
                "max_graphs": self.max_graphs}


CACHE = GraphCache()


def clear_graphs() -> None:
    """Drop every cached CUDA graph, return their memory to the driver, reset the counters."""
    CACHE.clear()


def graph_stats() -> Dict[str, int]:
    """{"cached", "captures", "replays", "max_graphs"} of the graph cache (since the last clear)."""
    return CACHE.stats()


def _warm_up(run, device) -> None:
    """One eager run on a side stream of `device`: lazy initialisation, autotuning and first
    allocations happen outside the graph."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)


def _capture(run, device):
    """Record `run` on a side stream of `device` (not of the current device)."""
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may allocate and synchronise meanwhile (sample() copies
        # its noise before taking the cache lock); the default, global, would break the capture
        with torch.cuda.graph(graph, pool=CACHE.pool, stream=torch.cuda.Stream(device=device),
                              capture_error_mode="thread_local"):
            run()
    return graph


def _record(sampler, noise: torch.Tensor, caller: ModelCaller, max_noise_bytes: int) -> _Recorded:
    x = noise.to(torch.float32, copy=True)
    # static copies of the conditioning tensors, read by the recorded model calls
    caller.cond = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in caller.cond.items()}
    caller.uncond = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in caller.uncond.items()}
    caller.state_ptr = x.untyped_storage().data_ptr()
    guidance = torch.full((), caller.w, dtype=torch.float32, device=x.device) if caller.guided else None
    draws = sampler.table.noise_draws  # one per noisy row (+ Heun's initial churn)
    buf = None
    if draws:
        nbytes = draws * x.numel() * x.element_size()
        if nbytes > max_noise_bytes:
            raise GraphCaptureError(f"noise: {draws} noise draws x {tuple(x.shape)} need {nbytes / 2**20:.0f} MiB "
                                    f"of static noise, over max_noise_bytes={max_noise_bytes}; use fewer steps, "
                                    "a deterministic solver, or cuda_graph=False")
        buf = new_slots(draws, x).normal_()  # in x's layout, as the fused step reads every tensor
    hist = sampler.new_history(x)
    times = sampler.model_times(x.device)  # made before recording: no host copies inside the graph

    def run():
        sampler.run_fused(caller, x, hist, lambda k: buf[k], 1.0 if guidance is None else guidance,
                          times=times)

    stage = "warm-up"
    try:  # under "auto", a loop that fails in its warm-up falls back too
        _warm_up(run, x.device)
        x.copy_(noise)
        stage = "capture"
        graph = _capture(run, x.device)
    except Exception as exc:  # capture errors come from CUDA/torch as RuntimeError and friends
        raise GraphCaptureError(f"model: the sampling loop cannot be captured in a CUDA graph ({stage} failed): {exc}. "
                                "Remove host synchronisation (.item(), .cpu(), printing tensors, data-"
                                "dependent shapes) from the model, or pass cuda_graph='auto' to fall back "
                                "to the eager fused loop") from exc
    return _Recorded(graph=graph, x=x, history=hist, times=times, caller=caller, guidance=guidance,
                     noise=buf)


def sample_graphed(sampler, model, noise: torch.Tensor, *, generator, guidance_scale, cond, uncond, cfg,
                   model_dtype, mode, max_noise_bytes: int = 1 << 30) -> Optional[torch.Tensor]:
    """Replay (capturing first if needed) the sampling loop. Returns None when `mode == "auto"`
    and the loop cannot be captured (the caller then runs the eager loop)."""
    caller = ModelCaller(model, noise, guidance_scale, cond, uncond, cfg, model_dtype, combine=False)
    key = graph_key(sampler, model, noise, caller)
    with CACHE.lock:
        rec = CACHE.get(key)
        if rec is None:
            try:
                nested = nested_graph_reason(model)
                if nested:
                    raise GraphCaptureError(f"model: {nested}")
                rec = _record(sampler, noise, caller, max_noise_bytes)
            except GraphCaptureError as exc:
                if mode != "auto":
                    raise
                warnings.warn(f"{exc}; running the eager fused loop", RuntimeWarning, stacklevel=3)
                return None
            CACHE.put(key, rec)
        CACHE.replays += 1
        return rec.replay(noise, cond, uncond if caller.guided else None, caller.w, generator)

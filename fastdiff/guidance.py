"""Calling the user's denoiser, with classifier-free guidance (CFG).

`ModelCaller` validates the model, the guidance inputs and the CFG mode once, then `bind()`
returns `call(x, t) -> (m, m_uncond)`:

* no guidance (w = 1): one call, `(m, None)`;
* `cfg="separate"`: two calls, `(m_cond, m_uncond)`;
* `cfg="batched"`: one call on the doubled batch `[x, x]` with `[uncond, cond]` inputs, the
  diffusers order; `(m_doubled, None)` for solver_step to split.

With `combine=True` (the reference path) the guided output m_u + w (m_c - m_u) is formed here,
in the solver state's precision, and returned as `(m, None)`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

CFG_MODES = ("batched", "separate")


MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def state_layout(x: torch.Tensor) -> torch.memory_format:
    """The dense layout of a solver state: contiguous, or channels_last for 4-D tensors."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise ValueError(f"noise: expected a contiguous or channels_last tensor, got shape {tuple(x.shape)} with strides "
                     f"{x.stride()}; call .contiguous() first")


def new_slots(n: int, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised (n, *x.shape) buffer whose every slot [k] has x's dense layout and
    dtype (or `dtype`)."""
    flat = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=dtype or x.dtype, device=x.device,
                       memory_format=state_layout(x))
    return flat.view((n,) + tuple(x.shape))


def check_guidance_scale(w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        got = f"a tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else repr(w)
        raise ValueError(f"guidance_scale: expected a finite real number, got {got}")
    return float(w)


def model_output_tensor(out) -> torch.Tensor:
    """The tensor of a model's output: the tensor itself, the `.sample` of an output object
    (diffusers' UNet2DOutput, Transformer2DModelOutput, ...) or the first element of a tuple/list
    (diffusers' return_dict=False)."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model: returned {type(out).__module__}.{type(out).__qualname__}; expected a tensor, an "
                    "object with a .sample tensor (diffusers' model outputs) or a tuple/list whose first element "
                    "is the tensor")


class ModelCaller:
    def __init__(self, model: Callable, x: torch.Tensor, guidance_scale: float, cond: Optional[Mapping],
                 uncond: Optional[Mapping], cfg: str, model_dtype: Optional[torch.dtype], combine: bool):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **cond), got {type(model).__name__}")
        if cfg not in CFG_MODES:
            raise ValueError(f"cfg: expected one of {list(CFG_MODES)}, got {cfg!r}")
        if model_dtype is not None and model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype: expected None or one of {list(MODEL_DTYPES)} (a torch.dtype), "
                             f"got {model_dtype!r}")
        self.w = check_guidance_scale(guidance_scale)
        self.guided = self.w != 1.0
        for name, kw in (("cond", cond), ("uncond", uncond)):
            if kw is not None and not isinstance(kw, Mapping):
                raise TypeError(f"{name}: expected a dict of keyword arguments for the model (e.g. "
                                f"{name}={{'context': tensor}}), got {type(kw).__name__}")
        if self.guided and uncond is None:
            raise ValueError(f"uncond: guidance_scale={self.w} needs the unconditional inputs (uncond=...)")
        self.cond, self.uncond = dict(cond or {}), dict(uncond or {})
        self.mode = "plain" if not self.guided else cfg
        self.model, self.model_dtype, self.combine = model, model_dtype, combine
        self.batch, self.state_dtype = x.shape[0], x.dtype
        self.state, self.state_ptr = x, x.untyped_storage().data_ptr()
        self.layout = state_layout(x)
        self._check_batches()
        if self.guided:
            self._check_pairs()

    def _check_batches(self) -> None:
        """Tensor conditioning carries the batch first, like x."""
        for name, kw in (("cond", self.cond), ("uncond", self.uncond if self.guided else {})):
            for k, v in kw.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] != self.batch:
                    raise ValueError(f"{name}[{k!r}]: expected batch {self.batch} (x's) as the first dimension, "
                                     f"got shape {tuple(v.shape)}")

    def _check_pairs(self) -> None:
        if set(self.cond) != set(self.uncond):
            raise ValueError(f"uncond: expected the same keys as cond {sorted(self.cond)}, got {sorted(self.uncond)}")
        if self.mode != "batched":
            return
        for k, c in self.cond.items():
            u = self.uncond[k]
            if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
                if c.shape != u.shape:
                    raise ValueError(f"cond[{k!r}]/uncond[{k!r}]: expected equal shapes with batch {self.batch}, "
                                     f"got {tuple(c.shape)} and {tuple(u.shape)}")
            elif not (c is u or c == u):
                raise ValueError(f"cond[{k!r}]: non-tensor arguments must be equal in cond and uncond for "
                                 "cfg='batched'; use cfg='separate'")

    def _run(self, x: torch.Tensor, t: torch.Tensor, kwargs, arg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's output on `arg` (the CFG-doubled input, already in the model's dtype) or,
        when None, on x itself: with no model_dtype cast nothing else copies it, so the model
        gets the solver state, no copy per step. A model that writes into its input would then
        corrupt the state, so that is detected (version counter) and is an error."""
        version = None
        if arg is None:
            arg = x if self.model_dtype is None else x.to(self.model_dtype)
            if arg is x and x.is_inference():
                arg = x.clone()  # inference tensors have no version counter: pay the copy instead
            elif arg is x:
                version = x._version
        out = model_output_tensor(self.model(arg, t, **kwargs))
        if version is not None and x._version != version:
            raise RuntimeError("model: modified its input x in place; fastdiff passes the solver state itself "
                               "(no copy), so the model must not write into it (use out-of-place ops, or "
                               "x = x.clone() at the top of forward)")
        if not isinstance(out, torch.Tensor) or out.shape != arg.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: expected an output of shape {tuple(arg.shape)}, got {got}")
        if out.dtype not in MODEL_DTYPES and not (out.dtype == torch.float64 == self.state_dtype):
            raise TypeError(f"model: returned {out.dtype}; expected a float32, float16 or bfloat16 output")
        if self.combine:
            return out.to(self.state_dtype)  # CFG and the solver run in the state's precision
        out = out.contiguous(memory_format=self.layout)  # a model output in another layout: one copy
        if out.untyped_storage().data_ptr() == self.state_ptr:
            out = out.clone()  # a model returning (a view of) its input: the fused step updates x in place
        return out

    @property
    def model_batch(self) -> int:
        """The batch of each model call: x's, doubled for cfg='batched'."""
        return 2 * self.batch if self.mode == "batched" else self.batch

    def _pair(self, m_u: torch.Tensor, m_c: torch.Tensor):
        return (m_u + self.w * (m_c - m_u), None) if self.combine else (m_c, m_u)

    def bind(self) -> Callable:
        """The per-step call `(x, t) -> (m, m_uncond)`, t the model time at `model_batch`. For
        cfg='batched' the doubled conditioning is concatenated here, once, and the doubled input
        is one buffer, refilled each step by one copy that writes both halves straight in the
        model's dtype."""
        if self.mode == "plain":
            return lambda x, t: (self._run(x, t, self.cond), None)
        if self.mode == "separate":
            return lambda x, t: self._pair(self._run(x, t, self.uncond), self._run(x, t, self.cond))
        doubled = {k: torch.cat([self.uncond[k], c]) if isinstance(c, torch.Tensor) else c
                   for k, c in self.cond.items()}
        pair = new_slots(2, self.state, self.model_dtype)  # (2, *x.shape): [uncond half, cond half]
        model_input = pair.view((2 * self.batch,) + tuple(pair.shape[2:]))

        def batched(x, t):
            pair.copy_(x)  # both halves (x broadcast), cast on the fly: one kernel
            m = self._run(x, t, doubled, arg=model_input)
            if not self.combine:
                return m, None  # solver_step splits the doubled batch (unconditional half first)
            m_u, m_c = m.chunk(2)
            return self._pair(m_u, m_c)

        return batched

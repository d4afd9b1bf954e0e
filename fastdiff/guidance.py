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

from typing import Callable, Mapping, Optional

import torch

CFG_MODES = ("batched", "separate")


class ModelCaller:
    def __init__(self, model: Callable, x: torch.Tensor, guidance_scale: float, cond: Optional[Mapping],
                 uncond: Optional[Mapping], cfg: str, model_dtype: Optional[torch.dtype], combine: bool):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **cond), got {type(model).__name__}")
        if cfg not in CFG_MODES:
            raise ValueError(f"cfg: expected one of {list(CFG_MODES)}, got {cfg!r}")
        self.w = float(guidance_scale)
        self.guided = self.w != 1.0
        if self.guided and uncond is None:
            raise ValueError(f"uncond: guidance_scale={self.w} needs the unconditional inputs (uncond=...)")
        self.cond, self.uncond = dict(cond or {}), dict(uncond or {})
        self.mode = "plain" if not self.guided else cfg
        self.model, self.model_dtype, self.combine = model, model_dtype, combine
        self.batch, self.state_dtype = x.shape[0], x.dtype
        self.state_ptr = x.untyped_storage().data_ptr()
        self.layout = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                       and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        if self.guided:
            self._check_pairs()

    def _check_pairs(self) -> None:
        if set(self.cond) != set(self.uncond):
            raise ValueError(f"uncond: expected the same keys as cond {sorted(self.cond)}, got {sorted(self.uncond)}")
        if self.mode != "batched":
            return
        for k, c in self.cond.items():
            u = self.uncond[k]
            if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
                if c.shape != u.shape or c.shape[:1] != (self.batch,):
                    raise ValueError(f"cond[{k!r}]/uncond[{k!r}]: expected equal shapes with batch {self.batch}, "
                                     f"got {tuple(c.shape)} and {tuple(u.shape)}")
            elif not (c is u or c == u):
                raise ValueError(f"cond[{k!r}]: non-tensor arguments must be equal in cond and uncond for "
                                 "cfg='batched'; use cfg='separate'")

    def _run(self, x: torch.Tensor, t: torch.Tensor, kwargs) -> torch.Tensor:
        out = self.model(x if self.model_dtype is None else x.to(self.model_dtype), t, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: expected an output of shape {tuple(x.shape)}, got {got}")
        if self.combine:
            return out.to(self.state_dtype)  # CFG and the solver run in the state's precision
        out = out.contiguous(memory_format=self.layout)  # a model output in another layout: one copy
        if out.untyped_storage().data_ptr() == self.state_ptr:
            out = out.clone()  # a model returning (a view of) its input: the fused step updates x in place
        return out

    def _pair(self, m_u: torch.Tensor, m_c: torch.Tensor):
        return (m_u + self.w * (m_c - m_u), None) if self.combine else (m_c, m_u)

    def bind(self) -> Callable:
        """The per-step call. For cfg='batched' the doubled inputs are concatenated here, once."""
        if self.mode == "plain":
            return lambda x, t: (self._run(x, t, self.cond), None)
        if self.mode == "separate":
            return lambda x, t: self._pair(self._run(x, t, self.uncond), self._run(x, t, self.cond))
        doubled = {k: torch.cat([self.uncond[k], c]) if isinstance(c, torch.Tensor) else c
                   for k, c in self.cond.items()}

        def batched(x, t):
            m = self._run(torch.cat([x, x]), torch.cat([t, t]), doubled)
            if not self.combine:
                return m, None  # solver_step splits the doubled batch (unconditional half first)
            m_u, m_c = m.chunk(2)
            return self._pair(m_u, m_c)

        return batched

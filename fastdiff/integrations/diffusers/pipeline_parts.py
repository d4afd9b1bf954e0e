"""The parts every pipeline family shares (`unet_pipelines`, `flow_pipelines`): the call's
arguments bound and checked against the pipeline's signature, the plan, the initial noise and
the fused denoising loop. `pipelines` (the entry point) picks the family; the families import
from here, never from `pipelines`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.graphs import CUDA_GRAPH_MODES
from fastdiff.guidance import check_guidance_scale
from fastdiff.optimize import check_memory_format
from fastdiff.sampler import BACKENDS, Sampler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
WRAPPERS = "_fastdiff_wrappers"  # the attribute of a denoiser holding its wrappers (see `wrapper`)
# Sampler options a call decides (the grid) or that accelerate() takes on its own
_CALL_OWNED = ("self", "steps", "sigmas", "timesteps", "backend", "first_step", "last_step")
PLAN_OPTIONS = tuple(p for p in inspect.signature(Sampler.__init__).parameters if p not in _CALL_OWNED)
_WHY = {
    "callback_on_step_end": "a step-end callback needs the host between steps and may edit the loop's tensors; "
                            "fastdiff runs the loop as one unit (one CUDA graph on a GPU)",
    "callback": "a per-step callback needs the host between steps; fastdiff runs the loop as one unit",
    "ip_adapter_image": "IP-Adapter image conditioning is not wired into fastdiff's loop",
    "skip_guidance_layers": "skip-layer guidance needs a third model call on some steps",
}


# Schedulers whose part-way start in diffusers (img2img's strength < 1, denoising_start) differs
# from a plan begun afresh at the first kept step, which is what fastdiff runs
_NO_PARTWAY_START = {
    "LMSDiscreteScheduler": "diffusers' LMS starts part-way at full order with one stored derivative: it "
                            "weights that derivative by the order-4 coefficient alone",
    "PNDMScheduler": "diffusers' PNDM (PLMS) takes its second model call as the corrector of the first step, "
                     "which part-way is a call at the next timestep",
    **{name: f"{name} starts part-way from the noised image in the data's units, where fastdiff's EDM plan "
             "keeps its state in units of sigma_data (only its start from noise and its end are mapped)"
       for name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")},
}
# Schedulers whose loop state is x0 + (sigma / alpha) noise (diffusers_state_scale)
_VE_STATE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


@dataclass(frozen=True)
class Options:
    """fastdiff's own options: where the loop runs, Sampler overrides of the scheduler's plan and
    the loop's latents layout (`denoise`; None: the latents' own)."""

    cuda_graph: object = "auto"
    backend: str = "auto"
    plan: dict = field(default_factory=dict)
    memory_format: Optional[torch.memory_format] = None

    def __post_init__(self):
        check_memory_format(self.memory_format)
        if self.cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph: expected one of {CUDA_GRAPH_MODES}, got {self.cuda_graph!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")
        for name in self.plan:
            if name in _CALL_OWNED:
                raise ValueError(f"{name}: set by the pipeline call (num_inference_steps, sigmas, timesteps, "
                                 "strength, denoising_start, denoising_end) or by backend=")
            if name not in PLAN_OPTIONS:
                raise ValueError(f"{name}: not a fastdiff.Sampler option (expected one of {list(PLAN_OPTIONS)})")


@dataclass(frozen=True)
class Family:
    """A diffusers pipeline class whose `__call__` fastdiff reproduces."""

    cls: type
    denoiser: str            # the attribute holding the model the loop calls ("unet", "transformer")
    supported: frozenset     # call arguments honoured; every other one must keep its default
    run: Callable            # run(pipe, args: dict of every call argument, options) -> the pipeline's output
    no_channels_last: Optional[str] = None  # why its loop cannot run channels_last (None: it can)


def _is_default(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    return type(value) is type(default) and value == default


def bind_call(fam: Family, pipe, args, kwargs) -> dict:
    """Every argument of the pipeline's `__call__` (defaults filled in), checked: those fastdiff
    does not honour must keep their defaults."""
    sig = inspect.signature(fam.cls.__call__)
    try:
        bound = sig.bind(pipe, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{fam.cls.__name__}.__call__: {e}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    del values["self"]
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = values.pop(name)  # SD/SDXL: the deprecated callback / callback_steps
            for key, value in extra.items():
                if key not in ("callback", "callback_steps"):
                    raise TypeError(f"{key}: not an argument of {fam.cls.__name__}.__call__")
                if key == "callback" and value is not None:
                    raise ValueError(f"callback: not supported by fastdiff ({_WHY['callback']}); "
                                     "fastdiff.restore(pipe) gives diffusers' own loop back")
            values["callback_steps"] = extra.get("callback_steps")
        elif name != "self" and name not in fam.supported and not _is_default(values[name], p.default):
            why = _WHY.get(name) or _WHY.get(name.replace("_embeds", "").replace("negative_", ""))
            raise ValueError(f"{name}: not supported by fastdiff ({why or 'not reproduced by fastdiff'}); "
                             "fastdiff.restore(pipe) gives diffusers' own loop back")
    check_common(values)
    return values


def check_common(a: dict) -> None:
    """Arguments the pipelines take alike, checked before any model runs."""
    for name in ("guidance_scale", "true_cfg_scale"):
        if name in a:
            check_guidance_scale(a[name])
    if "strength" in a and (isinstance(a["strength"], bool) or not isinstance(a["strength"], (int, float))
                            or not 0.0 <= a["strength"] <= 1.0):
        raise ValueError(f"strength: expected a number in [0, 1], got {a['strength']!r}")
    r = a.get("guidance_rescale", 0.0)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"guidance_rescale: expected a number in [0, 1], got {r!r}")
    for name in ("num_inference_steps", "num_images_per_prompt"):
        n = a[name]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {n!r}")
    if a["output_type"] not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {a['output_type']!r}")


def batch_size(a: dict) -> int:
    """Images per call, counted as the pipelines count them (prompts x num_images_per_prompt)."""
    prompt = a["prompt"]
    n = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else a["prompt_embeds"].shape[0]
    return n * a["num_images_per_prompt"]


def make_plan(pipe, a: dict, options: Options, strength: Optional[float] = None,
              denoising_start: Optional[float] = None, denoising_end: Optional[float] = None,
              from_state: bool = False, **grid) -> Sampler:
    """The plan of `pipe.scheduler` for this call. `grid`: the scheduler's set_timesteps arguments
    (sigmas, timesteps, mu), passed on when given; as diffusers' retrieve_timesteps, given sigmas
    or timesteps replace num_inference_steps. The cuts SDXL and the img2img pipelines make, as
    diffusers makes them: `strength` keeps the last int(N * strength) of the N steps,
    `denoising_start` (instead) the steps whose model time is below T (1 - denoising_start), the
    plan starting at the first kept step (Sampler's first_step: the scheduler's multistep warm-up
    starts there too); `denoising_end` stops before the first model time below T (1 -
    denoising_end) (Sampler's last_step: the steps before run as in the whole plan).
    `from_state`: the loop starts from a given state, not from noise times init_noise_sigma."""
    plan = dict(options.plan)
    # as prepare_extra_step_kwargs: the call's eta (default 0) goes to every step that takes one;
    # TCD's gamma included, whose step defaults to 0.3 when called without it
    if "eta" in inspect.signature(pipe.scheduler.step).parameters:
        plan.setdefault("eta", a.get("eta", 0.0))
    if from_state:
        plan["noise_scale"] = 1.0
    grid = {k: v for k, v in grid.items() if v is not None}
    steps = None if "sigmas" in grid or "timesteps" in grid else a["num_inference_steps"]
    sampler = Sampler.from_scheduler(pipe.scheduler, steps, backend=options.backend, **grid, **plan)
    if strength is None and denoising_start is None and denoising_end is None:
        return sampler
    n, times = sampler.steps, sampler.grid.model_time
    T = pipe.scheduler.config.num_train_timesteps
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and getattr(pipe.scheduler, "order", 1) != 1:
            raise ValueError(f"{name}: {type(pipe.scheduler).__name__} makes two model calls per step, which "
                             f"diffusers' cut by {name} may split; not reproduced by fastdiff")
    if denoising_start is not None:
        name, value = "denoising_start", denoising_start
        kept = int((times < int(round(T - denoising_start * T))).sum())
    else:
        name, value = "strength", strength
        kept = n if strength is None else min(int(n * strength), n)
    if kept == 0:
        raise ValueError(f"{name}: {value} keeps none of the {n} steps; raise num_inference_steps or start earlier")
    why = _NO_PARTWAY_START.get(type(pipe.scheduler).__name__)
    if kept < n and why:
        raise ValueError(f"{name}: {value} starts part-way; {why}, which fastdiff does not reproduce "
                         "(start at the first step or use another scheduler)")
    last = kept
    if denoising_end is not None:
        last = int((times[n - kept:] >= int(round(T - denoising_end * T))).sum())
        if last == 0:
            raise ValueError(f"denoising_end: {denoising_end} ends before the first of the {kept} steps "
                             f"(model time {times[n - kept]:g})")
    if kept == n and last == kept:
        return sampler
    return Sampler.from_scheduler(pipe.scheduler, steps, backend=options.backend, first_step=n - kept,
                                  last_step=last, **grid, **plan)


def diffusers_state_scale(pipe, sampler: Sampler, point: int = 0) -> float:
    """fastdiff's (variance-preserving) state is diffusers' loop state times this at grid point
    `point` of the plan: alpha there for the schedulers whose loop state is x0 + (sigma / alpha)
    noise (Euler-type: init_noise_sigma > 1, scale_model_input divides by
    sqrt(1 + (sigma/alpha)^2)), else 1. (The EDM plans' output_scale already returns diffusers'
    loop state; they do not start part-way: _NO_PARTWAY_START.)"""
    return float(sampler.grid.alpha[point]) if type(pipe.scheduler).__name__ in _VE_STATE else 1.0


def check_generator(sampler: Sampler, generator, batch: int, device: torch.device) -> None:
    """What diffusers checks when it draws the latents, and what fastdiff needs to draw step noise."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"generator: a list needs one generator per image ({batch}: prompts x "
                         f"num_images_per_prompt), got {len(generator)}")
    gens = generator if isinstance(generator, list) else [generator] if generator is not None else []
    if sampler.table.noise_draws and any(g.device.type != device.type for g in gens):
        raise ValueError(f"generator: this scheduler draws noise at every step on {device}; give a generator on "
                         f"{device.type} (diffusers would draw it on the generator's device and copy it over)")


def check_latents(latents: Optional[torch.Tensor], shape) -> None:
    if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape)):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents: expected shape {tuple(shape)} (batch, channels, height / vae scale, "
                         f"width / vae scale), got {got}")


def initial_noise(shape, generator, device, dtype, latents: Optional[torch.Tensor]) -> torch.Tensor:
    """The standard-normal initial latents (checked by `check_latents`), drawn as diffusers'
    prepare_latents draws them (the scheduler's init_noise_sigma belongs to the plan)."""
    if latents is None:
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    return latents.to(device=device, dtype=dtype)


def denoise(pipe, sampler: Sampler, model, noise: torch.Tensor, options: Options, *, guidance_scale: float,
            cond: dict, uncond: Optional[dict], generator, cfg: str = "batched",
            x0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused loop from `noise` (in the pipeline's latents dtype, which the model is called
    in; the solver state is float32); the final latents in that dtype. `uncond` None: no CFG.
    `x0`: img2img's clean image latents, noised to the plan's first level (Sampler.sample's x0).
    The pipeline's progress bar (`pipe.progress_bar`, as pipe.set_progress_bar_config sets it)
    counts the steps: one update per step, or all at once after a loop run as one CUDA graph.
    The result is diffusers' loop state at the plan's end (`diffusers_state_scale`: an
    Euler-type scheduler's, stopped short of the clean end by denoising_end, is x / alpha).
    `options.memory_format`: the loop's layout (the solver state follows the noise's, converted
    here once); the result is then contiguous, as the pipeline's own loop returns it."""
    dtype = noise.dtype
    graphed = options.cuda_graph is not False and noise.device.type == "cuda" and sampler.backend != "reference"
    layout = {} if options.memory_format is None else {"memory_format": options.memory_format}
    start = noise.to(torch.float32, **layout)
    with pipe.progress_bar(total=sampler.steps) as bar:
        x = sampler.sample(model, start, generator=generator if sampler.table.noise_draws else None,
                           guidance_scale=guidance_scale if uncond is not None else 1.0, cond=cond, uncond=uncond,
                           cfg=cfg, model_dtype=dtype if dtype != torch.float32 else None,
                           cuda_graph=options.cuda_graph, x0=None if x0 is None else x0.float(),
                           progress=False if graphed else lambda done, total: bar.update(1))
        if graphed:
            bar.update(sampler.steps)
    scale = diffusers_state_scale(pipe, sampler, sampler.steps)
    x = (x if scale == 1.0 else x / scale).to(dtype)
    return x if options.memory_format is None else x.contiguous()


def wrapper(module, cls):
    """One `cls(module)` per module: the CUDA-graph cache keys recorded loops by the model object,
    so the loop calls the same wrapper every time."""
    cache = module.__dict__.setdefault(WRAPPERS, {})
    if cls not in cache:
        cache[cls] = cls(module)
    return cache[cls]

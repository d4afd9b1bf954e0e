"""fastdiff.accelerate(pipe) on tiny random SD-1.x/2.x pipelines (configs, a tiny CLIP text
encoder; nothing downloaded): `pipe(...)` as diffusers calls it gives the untouched pipeline's
images within 1e-4 relative (float32), with diffusers' semantics (guidance <= 1: no CFG, one
model call per step; num_images_per_prompt, generator lists, output types, return_dict), and
fastdiff.restore(pipe) gives the pipeline's own loop back. memory_format=torch.channels_last
(SD and SDXL): the U-Net gets channels_last latents at every step, the same latents within 1e-5."""
import copy
import inspect

import numpy as np
import pytest
import torch

import fastdiff
from conftest import require

diffusers = require("diffusers", "diffusers")
require("transformers", "diffusers")
import diffusers_pipes as pipes  # noqa: E402
from diffusers_pipes import one_thread  # noqa: E402,F401 (autouse)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SCHEDULERS = {
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**SD),
    "ddim": lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD),
    "pndm": lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(**SD),
    "tcd": lambda: diffusers.TCDScheduler(**SD),  # the pipeline's eta (0) is TCD's gamma
}
TOL = 1e-4  # float32, relative: a few roundings per step through the fused kernels and blocks


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm())


def both(pipe, **kw):
    """(the untouched pipeline's output, the accelerated one's), the same generator seeds; the
    pipeline restored afterwards."""
    seeds = kw.pop("seeds", None)

    def call():
        gen = [torch.Generator().manual_seed(s) for s in seeds] if seeds else torch.Generator().manual_seed(0)
        return pipe(generator=gen, **kw)

    theirs = call()
    fastdiff.accelerate(pipe)
    try:
        ours = call()
    finally:
        fastdiff.restore(pipe)
    return theirs, ours


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("clip")


def calls(module):
    """The batch size of every forward call of `module`."""
    seen = []
    module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("guidance", [0.5, 1.0, 7.5])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_images_equal_diffusers(folder, name, guidance):
    pipe = pipes.sd(SCHEDULERS[name](), folder)
    seen = calls(pipe.unet)
    theirs, ours = both(pipe, prompt="a cat", negative_prompt="dog", num_inference_steps=4,
                        guidance_scale=guidance, output_type="pt")
    assert rel(ours.images, theirs.images) < TOL
    batch = 2 if guidance > 1 else 1  # diffusers: no CFG at guidance <= 1, one call per model time
    assert seen == [batch] * 2 * len(pipe.scheduler.timesteps)  # (PNDM: 5 model times for 4 steps)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_sd2_v_prediction_with_guidance_rescale(name):
    """SD-2.x: v-prediction, zero terminal SNR, trailing spacing, guidance_rescale. (4 steps: DDIM
    with trailing spacing steps to the next model time only when 1000 is a multiple of the steps,
    a documented difference of fastdiff's.)"""
    cfg = dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sched = (diffusers.DDIMScheduler(**cfg, clip_sample=False) if name == "ddim" else
             diffusers.DPMSolverMultistepScheduler(**cfg))
    pipe = pipes.sd(sched)
    g = torch.Generator().manual_seed(1)
    text, neg = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=6.0,
              output_type="latent")
    plain, _ = both(pipe, **kw)
    theirs, ours = both(pipe, guidance_rescale=0.7, **kw)
    assert rel(ours.images, theirs.images) < TOL
    assert rel(theirs.images, plain.images) > 1e-2  # the rescale is not a no-op here


@pytest.mark.parametrize("name", ["ddpm", "lcm"])
def test_stochastic_schedulers_draw_the_same_noise(name):
    """DDPM and LCM draw noise at each step from the call's generator, in diffusers' order."""
    if name == "ddpm":
        sched = diffusers.DDPMScheduler(**SD, clip_sample=False)
    else:
        sched = diffusers.LCMScheduler(**SD)
    pipe = pipes.sd(sched)
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    theirs, ours = both(pipe, prompt_embeds=text, num_inference_steps=3, guidance_scale=1.0, output_type="pt")
    assert rel(ours.images, theirs.images) < TOL


def test_batches_generators_and_output_types(folder):
    """num_images_per_prompt x prompts with a list of generators; pil (the default), np, latent
    and return_dict=False."""
    pipe = pipes.sd(SCHEDULERS["dpmpp_2m"](), folder)
    kw = dict(prompt=["a cat", "a dog"], negative_prompt=["x", "y"], num_images_per_prompt=2, num_inference_steps=3,
              seeds=[1, 2, 3, 4])
    theirs, ours = both(pipe, output_type="np", **kw)
    assert ours.images.shape == theirs.images.shape == (4, 16, 16, 3)
    assert rel(ours.images, theirs.images) < TOL
    theirs, ours = both(pipe, **kw)  # pil
    assert [im.size for im in ours.images] == [im.size for im in theirs.images] == [(16, 16)] * 4
    pixels = [np.abs(np.asarray(a, float) - np.asarray(b, float)).max() for a, b in zip(ours.images, theirs.images)]
    assert max(pixels) <= 1  # uint8: at most a rounding apart
    theirs, ours = both(pipe, output_type="latent", return_dict=False, **kw)
    assert isinstance(ours, tuple) and ours[1] is None and ours[0].shape == (4, 4, 8, 8)
    assert rel(ours[0], theirs[0]) < TOL
    # a list of generators gives each image its own noise: image 0 alone equals image 0 of the batch
    single, _ = both(pipe, output_type="latent", prompt="a cat", negative_prompt="x", num_inference_steps=3, seeds=[1])
    assert rel(single.images[0], theirs[0][0]) < TOL


def test_given_latents_and_size(folder):
    pipe = pipes.sd(SCHEDULERS["ddim"](), folder)
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(5))
    theirs, ours = both(pipe, prompt="a cat", height=32, width=48, latents=latents, num_inference_steps=3,
                        output_type="pt")
    assert ours.images.shape == (1, 3, 32, 48)
    assert rel(ours.images, theirs.images) < TOL


def test_accelerate_and_restore(folder):
    pipe = pipes.sd(SCHEDULERS["ddim"](), folder)
    cls, signature = type(pipe), inspect.signature(pipe.__call__)
    blocks = {name: type(m) for name, m in pipe.unet.named_modules()}
    processors = dict(pipe.unet.attn_processors)
    assert fastdiff.accelerate(pipe) is pipe
    assert inspect.signature(pipe.__call__) == signature and type(pipe).__name__ == cls.__name__
    assert any("Fused" in type(m).__name__ for m in pipe.unet.modules())  # optimize() ran
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="pt")
    ours = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    via_function = fastdiff.pipeline_sample(pipe, generator=torch.Generator().manual_seed(0), prompt="a cat", steps=3,
                                            output_type="pt").images
    assert torch.equal(ours, via_function)
    assert fastdiff.restore(pipe) is pipe
    assert type(pipe) is cls
    assert {name: type(m) for name, m in pipe.unet.named_modules()} == blocks
    assert {k: type(p) for k, p in pipe.unet.attn_processors.items()} == {k: type(p) for k, p in processors.items()}
    with pytest.raises(ValueError, match="pipe: this StableDiffusionPipeline is not accelerated"):
        fastdiff.restore(pipe)
    # accelerating twice replaces the options; one restore undoes it
    fastdiff.accelerate(pipe, optimize=False)
    fastdiff.accelerate(pipe, backend="reference")
    fastdiff.restore(pipe)
    assert type(pipe) is cls and {name: type(m) for name, m in pipe.unet.named_modules()} == blocks


def test_bad_input_is_named_before_any_model_call(folder):
    pipe = fastdiff.accelerate(pipes.sd(SCHEDULERS["ddim"](), folder))
    seen = calls(pipe.unet), calls(pipe.text_encoder)
    cases = [
        (dict(callback_on_step_end=lambda *a: {}), ValueError, "callback_on_step_end: not supported"),
        (dict(callback=lambda *a: None), ValueError, "callback: not supported"),
        (dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 4)]), ValueError, "ip_adapter_image_embeds: not supported"),
        (dict(num_inference_step=3), TypeError, "num_inference_step: not an argument"),
        (dict(output_type="png"), ValueError, "output_type: expected one of"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt: expected an integer >= 1"),
        (dict(guidance_rescale=2.0), ValueError, "guidance_rescale: expected a number in"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "generator: a list needs one generator per image"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            pipe(prompt="a cat", num_inference_steps=2, **kw)
    with pytest.raises(ValueError, match="latents: expected shape"):
        pipe(prompt="a cat", num_inference_steps=2, latents=torch.zeros(1, 4, 3, 3))
    assert seen == ([], [])
    with pytest.raises(ValueError, match="steps: the same as num_inference_steps"):
        fastdiff.pipeline_sample(pipe, prompt="a cat", steps=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="solve: not a fastdiff.Sampler option"):
        fastdiff.accelerate(pipe, solve="ddim")
    with pytest.raises(TypeError, match="pipe: expected one of the diffusers pipelines"):
        fastdiff.accelerate(object())
    # a bad memory_format leaves the accelerated pipeline as it was (not restored, weights untouched)
    fused, strides = [type(m) for m in pipe.unet.modules()], [p.stride() for p in pipe.unet.parameters()]
    for bad in (torch.preserve_format, torch.channels_last_3d, "channels_last"):
        with pytest.raises(ValueError, match="memory_format: expected None, torch.contiguous_format or "
                                             "torch.channels_last, got"):
            fastdiff.accelerate(pipe, memory_format=bad)
    assert [type(m) for m in pipe.unet.modules()] == fused and [p.stride() for p in pipe.unet.parameters()] == strides


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pipeline_sample_with_diffusers_arguments(backend):
    """The function under accelerate(): the pipeline's own arguments, fastdiff's steps= and
    backend= (the textbook reference solvers, or the fused step's compiled CPU kernel)."""
    if backend == "cpu":
        from conftest import setup_backend

        mp = pytest.MonkeyPatch()
        setup_backend("cpu", "solver_step", mp)
        mp.undo()
    pipe = pipes.sd(SCHEDULERS["dpmpp_2m"]())
    text, neg = torch.randn(2, 1, 7, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, guidance_scale=3.0, output_type="pt")
    theirs = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(0), **kw).images
    ours = fastdiff.pipeline_sample(pipe, steps=5, backend=backend, generator=torch.Generator().manual_seed(0),
                                    **kw).images
    assert rel(ours, theirs) < TOL


# half precision, relative on the latents after 4 steps: diffusers keeps the latents in the
# model's dtype through the loop, fastdiff keeps a float32 state, so the two differ by about the
# half-precision run's own error (measured: fp16 6e-3, bf16 5e-2)
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    """Within HALF_TOL of diffusers' own half-precision images, and no further from the float32
    pipeline's than diffusers' own (a float32 solver state loses less)."""
    text, neg = torch.randn(2, 1, 7, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="latent")
    exact, _ = both(pipes.sd(SCHEDULERS["dpmpp_2m"]()), prompt_embeds=text, negative_prompt_embeds=neg, **kw)
    half = pipes.sd(SCHEDULERS["dpmpp_2m"]()).to(dtype)
    theirs, ours = both(half, prompt_embeds=text.to(dtype), negative_prompt_embeds=neg.to(dtype), **kw)
    assert ours.images.dtype == dtype
    assert rel(ours.images.float(), theirs.images.float()) < HALF_TOL[dtype]
    assert rel(ours.images.float(), exact.images) <= 1.25 * rel(theirs.images.float(), exact.images)


def _bar_counts(text):
    """The step counters a tqdm bar printed ("k/N"), in order."""
    import re

    return [int(k) for k in re.findall(r"(\d+)/\d+ \[", text)]


def test_progress_bar_like_diffusers():
    """The pipeline's own tqdm bar (pipe.progress_bar) counts the steps, one update per step as
    diffusers' loop makes; set_progress_bar_config(disable=True) silences it."""
    import io

    pipe = pipes.sd(SCHEDULERS["dpmpp_2m"]())
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt_embeds=text, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    printed = []
    for accelerated in (False, True):
        out = io.StringIO()
        pipe.set_progress_bar_config(disable=False, file=out, mininterval=0)
        if accelerated:
            fastdiff.accelerate(pipe)
        pipe(**kw)
        printed.append(out.getvalue())
    # diffusers' own: the bar opens at 0, one update per step, the last state again at close
    assert _bar_counts(printed[0]) == [0, 1, 2, 3, 4, 4]
    assert _bar_counts(printed[1]) == _bar_counts(printed[0])
    out = io.StringIO()
    pipe.set_progress_bar_config(disable=True, file=out)
    pipe(**kw)
    fastdiff.restore(pipe)
    assert out.getvalue() == ""


@pytest.mark.parametrize("karras", [False, True])
def test_euler_ending_at_sigma_min_returns_diffusers_loop_state(karras):
    """Euler's loop state is x0 + (sigma/alpha) noise: ending at sigma_min (not 0), the latents
    are fastdiff's state / alpha_min, as diffusers returns them (4e-4 apart otherwise)."""
    pipe = pipes.sd(diffusers.EulerDiscreteScheduler(**SD, final_sigmas_type="sigma_min", use_karras_sigmas=karras))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    theirs, ours = both(pipe, prompt_embeds=text, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    assert rel(ours.images, theirs.images) < TOL


def test_weight_changes_reach_the_unet_accelerated_and_restored():
    """accelerate() packs the U-Net's q/k/v weights into one buffer (the parameters become views
    of it); weight changes made while accelerated or after restore() reach the next U-Net call,
    as on a U-Net that was never accelerated."""
    pipe = pipes.sd(SCHEDULERS["ddim"]())
    plain = copy.deepcopy(pipe.unet)
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(700.0), torch.randn(2, 7, 32, generator=g))

    def change(unet, seed, assign):
        with torch.no_grad():
            for name, p in sorted(unet.named_parameters()):
                if ".to_k." in name or ".to_q." in name:
                    delta = 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
                    if assign:
                        p.data = p.data + delta  # a new tensor (peft's safe merge)
                    else:
                        p.data += delta  # in place (peft's merge)

    def agree():
        with torch.no_grad():
            assert rel(pipe.unet(*args).sample, plain(*args).sample) < TOL

    fastdiff.accelerate(pipe)
    agree()
    for seed, assign in ((1, False), (2, True)):
        for unet in (pipe.unet, plain):
            change(unet, seed, assign)
        agree()
    fastdiff.restore(pipe)
    for seed, assign in ((3, False), (4, True)):
        for unet in (pipe.unet, plain):
            change(unet, seed, assign)
        agree()
    fastdiff.accelerate(pipe)
    agree()
    fastdiff.restore(pipe)


@pytest.mark.parametrize("make", [
    lambda: diffusers.EDMEulerScheduler(final_sigmas_type="sigma_min", sigma_data=0.7),
    lambda: diffusers.EDMDPMSolverMultistepScheduler(sigma_data=0.7),  # Playground v2.5's scheduler
    lambda: diffusers.KDPM2AncestralDiscreteScheduler(**SD),
    lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing"),  # t - T // N steps
    lambda: diffusers.PNDMScheduler(**SD),  # its Runge-Kutta warm-up
    lambda: diffusers.DPMSolverSinglestepScheduler.from_config(dict(SD, solver_order=3))],
    ids=["edm_euler", "edm_dpmsolver", "kdpm2_ancestral", "ddim_trailing", "pndm_prk", "dpmsolver_3s"])
def test_more_schedulers_equal_diffusers(make):
    """The EDM schedulers' sigma_data-unit state, KDPM2 ancestral's noise, DDIM's and PNDM's
    t - T // N steps, PNDM's warm-up and DPM-Solver++(3S) through the pipeline: its own latents."""
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    pipe = pipes.sd(make())
    theirs, ours = both(pipe, prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text),
                        num_inference_steps=7, guidance_scale=7.5, output_type="latent")
    assert rel(ours.images, theirs.images) < TOL


def test_edm_img2img_is_refused_by_name():
    """A part-way start is not mapped for the EDM plans: strength < 1 is refused before any call."""
    pipe = pipes.sd_img2img(diffusers.EDMEulerScheduler())
    fastdiff.accelerate(pipe)
    try:
        with pytest.raises(ValueError, match="strength: 0.5 starts part-way; EDMEulerScheduler"):
            pipe(prompt_embeds=torch.zeros(1, 7, 32), image=torch.rand(1, 3, 32, 32), strength=0.5,
                 num_inference_steps=4, output_type="latent")
    finally:
        fastdiff.restore(pipe)


CL_TOL = 1e-5  # float32, relative: the same ops in another memory order (other summation orders in the convolutions)


def _strictly_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _unet_layouts(unet):
    """Per U-Net call: (its sample input, its output) strictly channels_last; -> (list, hook handles)."""
    seen = []

    def before(m, args, kwargs):
        seen.append([_strictly_channels_last(args[0] if args else kwargs["sample"])])

    def after(m, args, kwargs, out):
        seen[-1].append(_strictly_channels_last(out[0]))

    return seen, [unet.register_forward_pre_hook(before, with_kwargs=True),
                  unet.register_forward_hook(after, with_kwargs=True)]


@pytest.mark.parametrize("optimize", [True, False], ids=["optimized", "not-optimized"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_channels_last_loop_equals_the_contiguous_one(folder, kind, optimize):
    """memory_format=torch.channels_last: NHWC convolution weights, and the U-Net gets (and
    returns) channels_last latents at every step (the loop's latents are converted, not the
    weights alone); latents and images equal accelerate()'s without it; restore() puts back
    every parameter's strides and the untouched pipeline's output."""
    if kind == "sd":
        pipe = pipes.sd(SCHEDULERS["dpmpp_2m"](), folder)
    else:
        pipe = pipes.sdxl(diffusers.DPMSolverMultistepScheduler(**SD), folder / kind)
    strides = {name: p.stride() for name, p in pipe.unet.named_parameters()}
    kw = dict(prompt="a cat", negative_prompt="dog", num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.5)

    def call(output_type):
        return pipe(generator=torch.Generator().manual_seed(0), output_type=output_type, **kw).images

    untouched = call("pt")
    fastdiff.accelerate(pipe, optimize=optimize)
    plain = call("latent"), call("pt")
    fastdiff.accelerate(pipe, optimize=optimize, memory_format=torch.channels_last)
    convs = [p for p in pipe.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(_strictly_channels_last(p) for p in convs)
    seen, hooks = _unet_layouts(pipe.unet)
    ours = call("latent"), call("pt")
    for h in hooks:
        h.remove()
    assert seen == [[True, True]] * 6  # two calls of 3 steps (CFG batched)
    assert ours[0].is_contiguous()  # the returned latents: contiguous (accelerate's docstring)
    assert rel(ours[0], plain[0]) < CL_TOL and rel(ours[1], plain[1]) < CL_TOL
    fastdiff.restore(pipe)
    assert {name: p.stride() for name, p in pipe.unet.named_parameters()} == strides
    assert torch.equal(call("pt"), untouched)


@pytest.mark.parametrize("start", ["given-latents", "img2img"])
def test_channels_last_from_given_latents_and_images(start):
    """Given `latents=` (contiguous; the caller's tensor left as it is) and img2img's noised image
    latents start the loop channels_last too."""
    text, neg = torch.randn(2, 1, 7, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=7.5,
              output_type="latent")
    if start == "img2img":
        pipe = pipes.sd_img2img(SCHEDULERS["ddim"]())
        kw.update(image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)), strength=0.75)
    else:
        pipe = pipes.sd(SCHEDULERS["ddim"]())
        kw.update(latents=torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(5)), height=16, width=24)
    given = {k: v.clone() for k, v in kw.items() if k in ("latents", "image")}

    def call():
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    fastdiff.accelerate(pipe)
    plain = call()
    fastdiff.accelerate(pipe, memory_format=torch.channels_last)
    seen, hooks = _unet_layouts(pipe.unet)
    try:
        ours = call()
    finally:
        for h in hooks:
            h.remove()
        fastdiff.restore(pipe)
    assert seen == [[True, True]] * (3 if start == "img2img" else 4)  # img2img: int(4 * 0.75) steps
    assert rel(ours, plain) < CL_TOL
    assert all(torch.equal(kw[k], v) and kw[k].is_contiguous() for k, v in given.items())


def test_contiguous_format_converts_channels_last_weights_back_until_restore():
    """A U-Net the user made channels_last: memory_format=torch.contiguous_format runs it with
    contiguous weights; restore() gives the channels_last strides back."""
    pipe = pipes.sd(SCHEDULERS["ddim"]())
    pipe.unet.to(memory_format=torch.channels_last)
    strides = {name: p.stride() for name, p in pipe.unet.named_parameters()}
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt_embeds=text, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    fastdiff.accelerate(pipe)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.accelerate(pipe, memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in pipe.unet.parameters())
    assert rel(pipe(generator=torch.Generator().manual_seed(0), **kw).images, plain) < CL_TOL
    fastdiff.restore(pipe)
    assert {name: p.stride() for name, p in pipe.unet.named_parameters()} == strides
    assert any(_strictly_channels_last(p) for p in pipe.unet.parameters())

"""fastdiff.accelerate(pipe) on tiny random img2img pipelines (StableDiffusionImg2ImgPipeline,
StableDiffusionXLImg2ImgPipeline; a tiny VAE encodes the image): `strength` keeps the last
int(N * strength) steps of the scheduler's plan and the loop starts from the image latents
noised to the first kept level; the images equal the untouched pipeline's within 1e-4 relative
(float32), for several schedulers, strengths and guidance scales."""
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import require

diffusers = require("diffusers", "diffusers")
require("transformers", "diffusers")
import diffusers_pipes as pipes  # noqa: E402
from diffusers_pipes import one_thread  # noqa: E402,F401 (autouse)
from test_accelerate_sd import SCHEDULERS, SD, TOL, both, calls, rel  # noqa: E402

import fastdiff  # noqa: E402

STEPS = 6


def _image(batch=1, seed=7, size=16):
    """Pixel values in [0, 1], as the pipelines take a tensor image."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _embeds(seed=1):
    g = torch.Generator().manual_seed(seed)
    text, neg = torch.randn(2, 1, 7, 32, generator=g)
    return dict(prompt_embeds=text, negative_prompt_embeds=neg)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("name", ["dpmpp_2m", "ddim", "euler", "unipc"])
def test_sd_img2img_equals_diffusers(name, strength, guidance):
    pipe = pipes.sd_img2img(SCHEDULERS[name]())
    seen = calls(pipe.unet)
    theirs, ours = both(pipe, image=_image(), strength=strength, num_inference_steps=STEPS, guidance_scale=guidance,
                        output_type="pt", **_embeds())
    assert rel(ours.images, theirs.images) < TOL
    kept = int(STEPS * strength)  # diffusers' get_timesteps
    assert seen == [2 if guidance > 1 else 1] * 2 * kept


def test_strength_changes_the_image():
    """The test above could pass with the image ignored: a lower strength stays nearer the image."""
    pipe = fastdiff.accelerate(pipes.sd_img2img(SCHEDULERS["dpmpp_2m"]()))
    image = _image()

    def run(strength):
        return pipe(image=image, strength=strength, num_inference_steps=STEPS, output_type="pt", guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), **_embeds()).images

    encoded = pipe(image=image, strength=1 / STEPS, num_inference_steps=STEPS, output_type="pt", guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0), **_embeds()).images
    assert rel(run(0.3), encoded) < rel(run(1.0), encoded)


@pytest.mark.parametrize("name", ["heun", "kdpm2", "euler_ancestral", "ddpm", "lcm", "tcd", "deis", "dpm_sde",
                                  "dpm_single", "karras", "lms", "pndm"])
def test_sd_img2img_other_schedulers(name):
    """The other schedulers fastdiff maps: their plans cut the same way (Heun and KDPM2: diffusers
    drops 2 timesteps per step; the stochastic ones draw their step noise after the image's).
    LMS and PNDM start part-way differently (refused below): at strength 1 only."""
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = dict(heun=lambda: diffusers.HeunDiscreteScheduler(**SD),
                 kdpm2=lambda: diffusers.KDPM2DiscreteScheduler(**SD),
                 euler_ancestral=lambda: diffusers.EulerAncestralDiscreteScheduler(**SD),
                 ddpm=lambda: diffusers.DDPMScheduler(**SD, clip_sample=False),
                 lcm=lambda: diffusers.LCMScheduler(**SD), tcd=lambda: diffusers.TCDScheduler(**SD),
                 deis=lambda: diffusers.DEISMultistepScheduler(**SD),
                 dpm_sde=lambda: diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++"),
                 dpm_single=lambda: diffusers.DPMSolverSinglestepScheduler(**sd),
                 karras=lambda: diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True),
                 lms=lambda: diffusers.LMSDiscreteScheduler(**SD),
                 pndm=lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True))[name]()
    pipe = pipes.sd_img2img(sched)
    strength = 1.0 if name in ("lms", "pndm") else 0.6
    theirs, ours = both(pipe, image=_image(), strength=strength, num_inference_steps=5, guidance_scale=3.0,
                        output_type="pt", **_embeds())
    assert rel(ours.images, theirs.images) < TOL


def test_pil_image_batches_and_generator_lists(tmp_path):
    """A PIL image through the image processor, prompt strings, 2 prompts x 2 images with one
    generator each (each image's VAE sample and noise from its own), and image latents given as
    a 4-channel image."""
    pipe = pipes.sd_img2img(SCHEDULERS["dpmpp_2m"](), tmp_path)
    pil = PIL.Image.fromarray((_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    kw = dict(prompt=["a cat", "a dog"], negative_prompt=["x", "y"], num_images_per_prompt=2, strength=0.7,
              num_inference_steps=4, output_type="np", seeds=[1, 2, 3, 4])
    theirs, ours = both(pipe, image=pil, **kw)
    assert ours.images.shape == theirs.images.shape == (4, 16, 16, 3)
    assert rel(ours.images, theirs.images) < TOL
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs, ours = both(pipe, image=latents, **kw)
    assert rel(ours.images, theirs.images) < TOL


@pytest.mark.parametrize("guidance, rescale", [(1.0, 0.0), (5.0, 0.0), (5.0, 0.7)])
def test_sdxl_img2img(tmp_path, guidance, rescale):
    """Prompt strings through both encoders, size conditioning with negative sizes, two images
    per prompt."""
    pipe = pipes.sdxl(diffusers.EulerDiscreteScheduler(**SD), tmp_path, diffusers.StableDiffusionXLImg2ImgPipeline)
    seen = calls(pipe.unet)
    theirs, ours = both(pipe, image=_image(), prompt="a cat", negative_prompt="dog", strength=0.6,
                        num_inference_steps=5, guidance_scale=guidance, guidance_rescale=rescale, output_type="pt",
                        original_size=(24, 16), crops_coords_top_left=(2, 0), negative_original_size=(8, 8),
                        negative_target_size=(16, 16), num_images_per_prompt=2, seeds=[1, 2])
    assert ours.images.shape == (2, 3, 16, 16)
    assert rel(ours.images, theirs.images) < TOL
    assert seen == [4 if guidance > 1 else 2] * 2 * 3


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_sdxl_img2img_aesthetic_score(tmp_path, name):
    """requires_aesthetics_score (the refiner's time ids): aesthetic_score and its negative."""
    pipe = pipes.sdxl(SCHEDULERS[name](), tmp_path, diffusers.StableDiffusionXLImg2ImgPipeline,
                      requires_aesthetics_score=True)
    kw = dict(image=_image(), prompt="a cat", negative_prompt="dog", strength=0.5, num_inference_steps=6,
              guidance_scale=4.0, output_type="pt")
    plain, _ = both(pipe, **kw)
    theirs, ours = both(pipe, aesthetic_score=9.0, negative_aesthetic_score=1.0, **kw)
    assert rel(ours.images, theirs.images) < TOL
    assert rel(theirs.images, plain.images) > 1e-3  # the score reaches the model


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_sdxl_img2img_from_given_latents_and_denoising_start(tmp_path, name):
    """diffusers' loop state given as `latents` (Euler's in sigma/alpha coordinates: fastdiff's
    state is it times alpha), and the refiner's denoising_start: the plan cut at T (1 - start),
    the image latents taken as that state, no noise added."""
    pipe = pipes.sdxl(SCHEDULERS[name](), tmp_path, diffusers.StableDiffusionXLImg2ImgPipeline)
    latents = 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt="a cat", negative_prompt="dog", num_inference_steps=6, guidance_scale=4.0, output_type="pt")
    theirs, ours = both(pipe, image=_image(), latents=latents, strength=0.5, **kw)
    assert rel(ours.images, theirs.images) < TOL
    seen = calls(pipe.unet)
    theirs, ours = both(pipe, image=latents, denoising_start=0.6, strength=0.9, **kw)  # strength ignored
    assert rel(ours.images, theirs.images) < TOL
    pipe.scheduler.set_timesteps(6)
    kept = int((pipe.scheduler.timesteps < 400).sum())  # diffusers' cut: below T (1 - 0.6)
    assert 0 < kept < 6 and len(seen) == 2 * kept  # (both runs)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_sdxl_base_and_refiner_with_denoising_end(tmp_path, name):
    """The ensemble of experts: the base stops at denoising_end (the state there, still noisy; the
    steps before as in the whole plan), the refiner starts from it at denoising_start; an
    img2img call can stop early too. Euler's loop state is x0 + (sigma/alpha) noise there."""
    base = pipes.sdxl(SCHEDULERS[name](), tmp_path / "base")
    refiner = pipes.sdxl(SCHEDULERS[name](), tmp_path / "refiner", diffusers.StableDiffusionXLImg2ImgPipeline)
    kw = dict(prompt="a cat", negative_prompt="dog", num_inference_steps=6, guidance_scale=4.0)
    theirs, ours = both(base, denoising_end=0.7, output_type="latent", **kw)
    assert rel(ours.images, theirs.images) < TOL
    theirs_img, ours_img = both(refiner, image=theirs.images, denoising_start=0.7, output_type="pt", **kw)
    assert rel(ours_img.images, theirs_img.images) < TOL
    theirs, ours = both(refiner, image=_image(), strength=0.8, denoising_end=0.8, output_type="pt", **kw)
    assert rel(ours.images, theirs.images) < TOL


def test_img2img_bad_input_is_named_before_any_model_call(tmp_path):
    sd = fastdiff.accelerate(pipes.sd_img2img(SCHEDULERS["ddim"]()))
    xl = fastdiff.accelerate(pipes.sdxl(SCHEDULERS["ddim"](), tmp_path, diffusers.StableDiffusionXLImg2ImgPipeline))
    xl_heun = fastdiff.accelerate(pipes.sdxl(diffusers.HeunDiscreteScheduler(**SD), tmp_path / "heun",
                                             diffusers.StableDiffusionXLImg2ImgPipeline))
    lms = fastdiff.accelerate(pipes.sd_img2img(diffusers.LMSDiscreteScheduler(**SD)))
    pndm = fastdiff.accelerate(pipes.sd_img2img(diffusers.PNDMScheduler(**SD, skip_prk_steps=True)))
    seen = calls(sd.unet), calls(sd.vae), calls(xl.unet), calls(xl.vae), calls(xl.text_encoder), calls(lms.vae)
    cases = [
        (sd, dict(strength=1.5), "strength: expected a number in \\[0, 1\\]"),
        (sd, dict(strength="0.5"), "strength: expected a number in \\[0, 1\\]"),
        (sd, dict(strength=0.1), "strength: 0.1 keeps none of the 4 steps"),
        (sd, dict(image=None), "image: the image .* is required"),
        (sd, dict(image=_image(3)), "image: 3 images for 2 images"),
        (lms, dict(strength=0.5), "strength: 0.5 starts part-way; diffusers' LMS"),
        (pndm, dict(strength=0.5), "strength: 0.5 starts part-way; diffusers' PNDM"),
        (xl, dict(denoising_start=1), "denoising_start: expected a float in \\(0, 1\\)"),
        (xl, dict(denoising_start=0.999), "denoising_start: 0.999 keeps none of the 4 steps"),
        (xl_heun, dict(denoising_start=0.5), "denoising_start: HeunDiscreteScheduler makes two model calls"),
        (xl, dict(denoising_end=0.5, denoising_start=0.6), "denoising_end: expected more than denoising_start"),
        (xl, dict(denoising_end=1.0), "denoising_end: expected a float in \\(0, 1\\)"),
        (xl, dict(denoising_end=0.01), "denoising_end: 0.01 ends before the first of the 1 steps"),
        (xl, dict(latents=torch.zeros(1, 4, 8, 8)), "latents: expected shape \\(2, 4, height, width\\)"),
    ]
    for pipe, kw, match in cases:
        call = dict(image=_image(), prompt="a cat", num_inference_steps=4, num_images_per_prompt=2)
        if pipe not in (xl, xl_heun):
            call.pop("prompt")
            call.update(prompt_embeds=torch.randn(1, 7, 32))
        with pytest.raises(ValueError, match=match):
            pipe(**{**call, **kw})
    assert seen == ([], [], [], [], [], [])

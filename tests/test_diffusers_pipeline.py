"""fastdiff.pipeline_sample on a tiny random Stable-Diffusion pipeline assembled from configs
(no text encoder: prompt embeddings are given; no downloads): the images equal the pipeline's
own for the same scheduler config and latents."""
import pytest
import torch

import fastdiff
from conftest import require

diffusers = require("diffusers", "diffusers")
require("transformers", "diffusers")  # diffusers' StableDiffusionPipeline needs it importable

EMB = (1, 7, 32)  # (batch, tokens, cross_attention_dim)


def _pipeline(scheduler):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMB[2], norm_num_groups=32, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(EMB, generator=g), torch.randn(EMB, generator=g), torch.randn(1, 4, 8, 8, generator=g)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("scheduler", [
    lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
], ids=["dpmsolver++", "ddim"])
def test_images_equal_the_pipelines_own(inputs, scheduler, backend):
    if backend == "cpu":
        from conftest import setup_backend

        mp = pytest.MonkeyPatch()
        setup_backend("cpu", "solver_step", mp)
        mp.undo()
    pipe = _pipeline(scheduler())
    text, empty, latents = inputs
    ours = fastdiff.pipeline_sample(pipe, prompt_embeds=text, negative_prompt_embeds=empty, steps=5,
                                    guidance_scale=3.0, latents=latents, backend=backend)
    theirs = pipe(prompt_embeds=text, negative_prompt_embeds=empty, num_inference_steps=5, guidance_scale=3.0,
                  latents=latents, output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    assert torch.isfinite(ours).all() and ours.std() > 0
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, err
    lat = fastdiff.pipeline_sample(pipe, prompt_embeds=text, negative_prompt_embeds=empty, steps=5,
                                   guidance_scale=3.0, latents=latents, backend=backend, output_type="latent")
    assert lat.shape == latents.shape


def test_bad_input_is_named_before_any_model_call(inputs):
    pipe = _pipeline(diffusers.DDIMScheduler())
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    text, empty, latents = inputs
    cases = [
        (dict(prompt_embeds=text[0]), TypeError, "prompt_embeds: expected a float tensor"),
        (dict(prompt_embeds=text, negative_prompt_embeds=empty[:, :3]), ValueError, "negative_prompt_embeds: shape"),
        (dict(prompt_embeds=text), ValueError, "negative_prompt_embeds: guidance_scale != 1"),
        (dict(prompt_embeds=text, guidance_scale=1.0, latents=latents[:, :3]), ValueError, "latents: expected shape"),
        (dict(prompt_embeds=text, guidance_scale=1.0, output_type="png"), ValueError, "output_type"),
        (dict(prompt_embeds=text, guidance_scale=1.0, height=13), ValueError, "height/width"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastdiff.pipeline_sample(pipe, **kw)
    with pytest.raises(TypeError, match="pipe: expected a Stable-Diffusion-style"):
        fastdiff.pipeline_sample(object(), prompt_embeds=text)
    assert not calls

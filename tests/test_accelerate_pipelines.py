"""fastdiff.accelerate(pipe) on tiny random SDXL, SD3 and Flux pipelines (configs; tiny CLIP text
encoders for SDXL, prompt embeddings for SD3 and Flux; nothing downloaded): the images equal
the untouched pipeline's within 1e-4 relative (float32)."""
import pytest
import torch

from conftest import require

diffusers = require("diffusers", "diffusers")
require("transformers", "diffusers")
import diffusers_pipes as pipes  # noqa: E402
from diffusers_pipes import one_thread  # noqa: E402,F401 (autouse)
from test_accelerate_sd import SD, TOL, both, calls, rel  # noqa: E402

# FluxPipeline hands its scheduler sigmas and mu (from the image size): from_scheduler takes
# them once the scheduler-config issue (19) lands


def _embeds(*shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("guidance, rescale", [(1.0, 0.0), (5.0, 0.0), (5.0, 0.7)])
def test_sdxl(tmp_path, guidance, rescale):
    """Prompt strings through both text encoders, pooled embeddings and size conditioning."""
    pipe = pipes.sdxl(diffusers.DPMSolverMultistepScheduler(**SD), tmp_path)
    seen = calls(pipe.unet)
    theirs, ours = both(pipe, prompt="a cat", negative_prompt="dog", num_inference_steps=3, guidance_scale=guidance,
                        guidance_rescale=rescale, output_type="pt", original_size=(24, 16), target_size=(16, 16),
                        crops_coords_top_left=(2, 0), negative_original_size=(8, 8), negative_target_size=(16, 16))
    assert ours.images.shape == (1, 3, 16, 16)
    assert rel(ours.images, theirs.images) < TOL
    assert seen == [2 if guidance > 1 else 1] * 6


def test_sdxl_embeddings_and_images_per_prompt(tmp_path):
    pipe = pipes.sdxl(diffusers.DDIMScheduler(**SD, clip_sample=False), tmp_path)
    text, neg, pooled, neg_pooled = _embeds((1, 16, 64), (1, 16, 64), (1, 16), (1, 16))
    theirs, ours = both(pipe, prompt_embeds=text, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=neg_pooled, num_images_per_prompt=2, num_inference_steps=4,
                        output_type="np", seeds=[3, 4])
    assert ours.images.shape == (2, 16, 16, 3)
    assert rel(ours.images, theirs.images) < TOL


@pytest.mark.parametrize("per_prompt", [2, 3])
def test_sdxl_negative_size_conditioning_with_several_images(tmp_path, per_prompt):
    """diffusers repeats the [negative, positive] time ids pair over the doubled batch: beyond one
    image the two halves mix them (unet_pipelines' module doc); fastdiff pairs them the same way."""
    pipe = pipes.sdxl(diffusers.DPMSolverMultistepScheduler(**SD), tmp_path)
    theirs, ours = both(pipe, prompt="a cat", negative_prompt="dog", num_inference_steps=3, guidance_scale=5.0,
                        output_type="pt", num_images_per_prompt=per_prompt, original_size=(24, 16),
                        negative_original_size=(8, 8), negative_target_size=(48, 32),
                        negative_crops_coords_top_left=(4, 4), seeds=list(range(per_prompt)))
    assert rel(ours.images, theirs.images) < TOL


def _sd3_inputs():
    text, neg, pooled, neg_pooled = _embeds((1, 5, 32), (1, 5, 32), (1, 16), (1, 16))
    return dict(prompt_embeds=text, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled, height=16, width=16, num_inference_steps=3)


@pytest.mark.parametrize("guidance", [1.0, 7.0])
def test_sd3(guidance):
    pipe = pipes.sd3(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    seen = calls(pipe.transformer)
    theirs, ours = both(pipe, guidance_scale=guidance, output_type="pt", **_sd3_inputs())
    assert rel(ours.images, theirs.images) < TOL
    assert seen == [2 if guidance > 1 else 1] * 6


def test_sd3_refuses_skip_layer_guidance():
    import fastdiff

    pipe = fastdiff.accelerate(pipes.sd3(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))
    with pytest.raises(ValueError, match="skip_guidance_layers: not supported by fastdiff"):
        pipe(skip_guidance_layers=[1], **_sd3_inputs())


@pytest.mark.parametrize("dynamic", [False, True], ids=["shift", "dynamic-mu"])
@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux(dynamic, true_cfg):
    """Packed latents, rotary ids, the guidance embedding; true CFG with a negative prompt."""
    pipe = pipes.flux(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic))
    seen = calls(pipe.transformer)
    text, neg, pooled, neg_pooled = _embeds((1, 5, 32), (1, 5, 32), (1, 16), (1, 16))
    theirs, ours = both(pipe, prompt_embeds=text, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=true_cfg, guidance_scale=3.5,
                        height=16, width=24, num_inference_steps=3, output_type="pt")
    assert ours.images.shape == (1, 3, 16, 24)
    assert rel(ours.images, theirs.images) < TOL
    assert seen == [1] * (12 if true_cfg > 1 else 6)  # true CFG: two calls per step, as the pipeline makes


@pytest.mark.parametrize("build", [pipes.sd3, pipes.flux], ids=["sd3", "flux"])
def test_the_transformers_attention_runs_fused_until_restore(build):
    """The comparisons above run fastdiff's joint-attention processor; restore() gives diffusers' back."""
    import fastdiff
    from fastdiff.integrations.diffusers.transformer_models import FastdiffJointAttnProcessor

    pipe = build(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    attns = [m for m in pipe.transformer.modules() if hasattr(m, "set_processor")]
    theirs = [m.processor for m in attns]
    fastdiff.accelerate(pipe)
    assert attns and all(isinstance(m.processor, FastdiffJointAttnProcessor) for m in attns)
    fastdiff.restore(pipe)
    assert [m.processor for m in attns] == theirs


@pytest.mark.parametrize("build", [pipes.sd3, pipes.flux], ids=["sd3", "flux"])
def test_channels_last_is_refused_for_transformers_before_anything_changes(build):
    """Their latents are tokens, not 4-D feature maps: accelerate() names memory_format and the
    reason, and leaves the pipeline as it was (untouched, or accelerated as before)."""
    import fastdiff

    pipe = build(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    cls = type(pipe)

    def state():
        modules = pipe.transformer.modules()
        return type(pipe), [type(m) for m in modules], [p.stride() for p in pipe.transformer.parameters()]

    for accelerated in (False, True):
        if accelerated:
            fastdiff.accelerate(pipe)
        before = state()
        with pytest.raises(ValueError, match=rf"memory_format: torch.channels_last is for U-Net pipelines with 4-D "
                                             rf"latents; {cls.__name__}: its transformer runs on tokens"):
            fastdiff.accelerate(pipe, memory_format=torch.channels_last)
        assert state() == before
    assert type(pipe) is not cls
    fastdiff.restore(pipe)

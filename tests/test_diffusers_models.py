"""diffusers models run through fastdiff.sample as they are: their output objects (`.sample`) and
return_dict=False tuples are unwrapped by fastdiff (guidance.model_output_tensor), on every path.
Tiny random-init models built from configs; nothing is downloaded."""
import pytest
import torch

import fastdiff

from conftest import require
from fake_cuda_graph import fake_graphs, graphed  # noqa: F401

diffusers = require("diffusers", "diffusers")


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4).eval()


def _tiny_cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4).eval()


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sample_attr(model):
    return lambda x, t, **kw: model(x, t, **kw).sample


def _first_of_tuple(model):
    return lambda x, t, **kw: model(x, t, return_dict=False, **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unet2d_runs_unwrapped_and_equals_the_sample_wrapper(backend):
    unet = _tiny_unet()
    noise = _noise((2, 3, 8, 8))
    plan = dict(solver="dpmpp_2m", steps=3, backend=backend)
    bare = fastdiff.sample(unet, noise, **plan)
    assert torch.isfinite(bare).all()
    assert torch.equal(bare, fastdiff.sample(_sample_attr(unet), noise, **plan))
    assert torch.equal(bare, fastdiff.sample(_first_of_tuple(unet), noise, **plan))


@pytest.mark.parametrize("cfg", ["batched", "separate"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unet2d_condition_with_cfg_through_cond_dicts(backend, cfg):
    unet = _tiny_cond_unet()
    noise = _noise((2, 4, 8, 8))
    text, empty = _noise((2, 5, 12), 1), torch.zeros(2, 5, 12)
    kw = dict(solver="ddim", steps=3, schedule="scaled_linear", backend=backend, guidance_scale=4.0, cfg=cfg,
              cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty})
    bare = fastdiff.sample(unet, noise, **kw)
    assert torch.isfinite(bare).all()
    assert torch.equal(bare, fastdiff.sample(_sample_attr(unet), noise, **kw))
    # the conditioning reaches the model: another prompt gives another sample
    kw["cond"] = {"encoder_hidden_states": _noise((2, 5, 12), 2)}
    assert not torch.allclose(bare, fastdiff.sample(unet, noise, **kw))


def test_the_graph_path_records_a_diffusers_unet_and_replays_it(fake_graphs):
    """The CUDA-graph loop (a faithful fake graph on the CPU) with a diffusers U-Net and CFG:
    its .sample output is unwrapped inside the recording; replays with new embeddings equal
    the eager fused loop and need one capture."""
    unet = _tiny_cond_unet()
    sampler = fastdiff.Sampler(solver="dpmpp_2m", steps=3, schedule="scaled_linear", backend="cpu")
    noise, empty = _noise((2, 4, 8, 8)), torch.zeros(2, 5, 12)
    for seed in (1, 2):
        kw = dict(guidance_scale=4.0, cond={"encoder_hidden_states": _noise((2, 5, 12), seed)},
                  uncond={"encoder_hidden_states": empty})
        assert torch.equal(graphed(fake_graphs, sampler, unet, noise, **kw), sampler.sample(unet, noise, **kw))
    assert fake_graphs.graph_stats()["captures"] == 1 and fake_graphs.graph_stats()["replays"] == 2


def test_dit_transformer_class_conditional_unwrapped():
    """DiTTransformer2DModel: forward(hidden_states, timestep, class_labels) -> Transformer2DModelOutput."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10).eval()
    noise = _noise((2, 4, 8, 8))
    labels, null = torch.tensor([1, 7]), torch.tensor([9, 9])
    kw = dict(solver="dpmpp_2m", steps=3, backend="cpu", guidance_scale=3.0, cond={"class_labels": labels},
              uncond={"class_labels": null})
    bare = fastdiff.sample(dit, noise, **kw)
    assert torch.isfinite(bare).all()
    assert torch.equal(bare, fastdiff.sample(_sample_attr(dit), noise, **kw))


def test_sd3_transformer_flow_matching_plan_from_its_scheduler():
    """SD3Transformer2DModel takes encoder_hidden_states as its second positional parameter, so it
    is called with the time as a keyword (one lambda); the plan comes from its flow-matching
    scheduler, and the output object is unwrapped by fastdiff."""
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=8).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sampler = fastdiff.Sampler.from_scheduler(scheduler, steps=3, backend="cpu")
    assert sampler.prediction == "flow" and sampler.solver == "flow_euler"
    cond = {"encoder_hidden_states": _noise((1, 5, 12), 1), "pooled_projections": _noise((1, 6), 2)}
    model = lambda x, t, **kw: sd3(x, timestep=t, **kw)  # noqa: E731
    noise = _noise((1, 4, 8, 8))
    ours = sampler.sample(model, noise, cond=cond)
    # diffusers' own loop with the same model
    scheduler.set_timesteps(3)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(sd3(x, timestep=t.expand(1), **cond).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)

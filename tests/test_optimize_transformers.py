"""`fastdiff.optimize()` on diffusers' SD3 and Flux transformers (tiny random-init models built
from configs, never downloaded): their joint attention runs FastdiffJointAttnProcessor; the
optimized model gives the original's output (against the original run in float64, within the
tolerance table), keeps its parameters, reports each module once, is idempotent and keeps autograd."""
import collections
import copy

import pytest
import torch
import torch.nn as nn

import fastdiff
from conftest import require, setup_backend
from fastdiff.nn import functional as FD
from tolerances import assert_as_close_as, assert_close, rel_err

diffusers = require("diffusers", "diffusers")
import diffusers_pipes as pipes  # noqa: E402
from diffusers_pipes import one_thread  # noqa: E402,F401 (autouse)
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor  # noqa: E402

from fastdiff.integrations.diffusers.transformer_models import FastdiffJointAttnProcessor  # noqa: E402

BATCH, TEXT, TEXT_DIM, POOLED = 2, 5, 32, 16
FLUX_H, FLUX_W = 3, 4  # packed latent tokens: an odd, non-square grid

MODELS = {
    "sd3": pipes.sd3_transformer,  # no q/k norms
    # SD3.5: q/k RMSNorm, a dual-attention block (image-only attn2)
    "sd3.5": lambda: pipes.sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0,)),
    "flux": pipes.flux_transformer,
}


def _inputs(model, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    common = dict(encoder_hidden_states=rand(BATCH, TEXT, TEXT_DIM), pooled_projections=rand(BATCH, POOLED))
    if isinstance(model, diffusers.FluxTransformer2DModel):
        n = FLUX_H * FLUX_W
        rows, cols = torch.arange(n) // FLUX_W, torch.arange(n) % FLUX_W
        return dict(common, hidden_states=rand(BATCH, n, model.config.in_channels),
                    timestep=torch.tensor([0.9, 0.2]).to(dtype), guidance=torch.tensor([3.5, 3.5]).to(dtype),
                    img_ids=torch.stack([torch.zeros(n), rows, cols], -1), txt_ids=torch.zeros(TEXT, 3))
    size = model.config.sample_size
    return dict(common, hidden_states=rand(BATCH, model.config.in_channels, size, size),
                timestep=torch.tensor([999.0, 17.0]))


def _run(model, inputs):
    return model(**inputs).sample


def _float64_reference(model, inputs):
    with torch.no_grad():
        return _run(copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v
                                                    for k, v in inputs.items()})


def _joint_attentions(model):
    return [m for m in model.modules() if isinstance(m, (Attention, FluxAttention))]


# Triton's interpreter is slow: it runs the model with rotary embedding and the one with q/k norms
CASES = [(be, m) for be in ("cpu", "reference") for m in MODELS] + [("triton-interp", "sd3.5"),
                                                                     ("triton-interp", "flux")]


@pytest.mark.parametrize("backend_name,model_name", CASES)
def test_optimized_transformer_equals_the_original_fp32(backend_name, model_name, monkeypatch):
    be, _ = setup_backend(backend_name, None, monkeypatch)
    model = MODELS[model_name]()
    inputs = _inputs(model)
    ref = _float64_reference(model, inputs)
    keys = list(model.state_dict())
    opt = fastdiff.optimize(model, backend=be, inplace=False)
    with torch.no_grad():
        out = _run(opt, inputs)
        assert_close(out, ref, torch.float32, what=f"{model_name} optimized")
        assert_close(_run(model, inputs), ref, torch.float32, what=f"{model_name} original (untouched copy)")
        report = fastdiff.optimize_report(opt)
        assert torch.equal(_run(fastdiff.optimize(opt, backend=be), inputs), out)  # twice is once
        assert fastdiff.optimize_report(opt) == report
    assert list(opt.state_dict()) == keys
    assert all(isinstance(m.processor, FastdiffJointAttnProcessor) for m in _joint_attentions(opt))
    assert not any(isinstance(m.processor, FastdiffJointAttnProcessor) for m in _joint_attentions(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_optimized_transformer_in_half_precision(model_name, dtype, monkeypatch):
    """As for the U-Nets: diffusers' own half-precision run is off float64 by many table rows
    already (measured: fp16 7e-4 to 8e-4; bf16 2e-2 SD3, 1e-1 Flux); the optimized model may be
    off by at most that plus one table tolerance (measured: no worse than diffusers')."""
    be, _ = setup_backend("cpu", None, monkeypatch)
    model = MODELS[model_name]()
    inputs = _inputs(model)
    ref = _float64_reference(model, inputs)
    half_inputs = {k: v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
                   for k, v in inputs.items()}
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        theirs = _run(half, half_inputs)
        assert_as_close_as(_run(fastdiff.optimize(half, backend=be), half_inputs), theirs, ref, dtype, what=model_name)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_what_is_fused_and_the_report(model_name):
    model = MODELS[model_name]()
    params = {name: id(p) for name, p in model.named_parameters()}
    fastdiff.optimize(model, backend="reference")
    rep = fastdiff.optimize_report(model)
    assert {name: id(p) for name, p in model.named_parameters()} == params
    names = dict(model.named_modules())
    attns = [n for n, m in names.items() if isinstance(m, (Attention, FluxAttention))]
    assert attns and all(isinstance(names[n].processor, FastdiffJointAttnProcessor) for n in attns)
    reported = rep.modules()
    assert len(reported) == len(set(reported))
    assert sorted(n for n, _ in rep.replaced) == sorted(attns) and not rep.fused
    adaln = [n for n, m in names.items() if "AdaLayerNorm" in type(m).__name__]
    plain_norms = [n for n, m in names.items() if type(m) is nn.LayerNorm and not m.elementwise_affine
                   and not any(n.startswith(a + ".") for a in adaln)]
    why = dict(rep.not_replaced)
    assert sorted(why) == sorted(adaln + plain_norms) and adaln and plain_norms
    assert all("adaLN" in w for w in why.values())
    if model_name != "sd3":
        assert all("q/k RMSNorm" in w for _, w in rep.replaced)
    assert all(("rotary" in w) == (model_name == "flux") for _, w in rep.replaced)


@pytest.fixture
def attention_calls(monkeypatch):
    calls = collections.Counter()
    real = FD.fused_qkv_attention

    def spy(*args, **kwargs):
        calls["qkv_attention"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(FD, "fused_qkv_attention", spy)
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_inference_runs_the_fused_attention(model_name, mode, attention_calls, monkeypatch):
    be, _ = setup_backend("cpu", None, monkeypatch)
    model = fastdiff.optimize(MODELS[model_name](), backend=be)
    with getattr(torch, mode)():
        out = _run(model, _inputs(model))
    assert not out.requires_grad
    assert attention_calls["qkv_attention"] == len(_joint_attentions(model))


@pytest.mark.parametrize("model_name", ["sd3.5", "flux"])
def test_gradients_equal_the_originals(model_name, attention_calls, monkeypatch):
    """The fused attention's backward runs its eager twin; the in-place q/k norm and rotary
    embedding are differentiated by autograd: every gradient equals the original model's."""
    be, _ = setup_backend("cpu", None, monkeypatch)
    original = MODELS[model_name]()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    inputs = _inputs(original)
    weight = torch.randn(_run(original, inputs).shape, generator=torch.Generator().manual_seed(9))

    def grads(m):
        x = inputs["hidden_states"].clone().requires_grad_()
        out = _run(m, dict(inputs, hidden_states=x))
        leaves = [x] + list(m.parameters())
        return out, torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)

    out_ref, g_ref = grads(original)
    attention_calls.clear()
    out, g = grads(model)
    assert attention_calls["qkv_attention"] == len(_joint_attentions(model))
    assert [t is None for t in g] == [t is None for t in g_ref]
    flat = [torch.cat([t.flatten() for t in gs if t is not None]) for gs in (g, g_ref)]
    assert rel_err(flat[0], flat[1]) < 1e-5
    assert rel_err(out.detach(), out_ref.detach()) < 1e-5


class _UsersFluxProcessor(FluxAttnProcessor):
    """A processor subclass (as IP-Adapter's are): may change the computation."""


def _attention_zoo():
    """Single attention modules as SD3 and Flux configure them, at awkward sizes (batch 3, odd
    token counts, head_dim 40 and 24), and three that keep their processors."""
    torch.manual_seed(0)
    joint = dict(query_dim=48, heads=2, dim_head=24, out_dim=48, added_kv_proj_dim=48, bias=True, eps=1e-6)
    return pipes.randomise(nn.ModuleDict({
        "sd3_joint": Attention(**joint, context_pre_only=False, processor=JointAttnProcessor2_0()),
        "sd3_last": Attention(**joint, context_pre_only=True, qk_norm="rms_norm", processor=JointAttnProcessor2_0()),
        "sd3_attn2": Attention(query_dim=48, heads=2, dim_head=24, out_dim=48, bias=True, qk_norm="rms_norm", eps=1e-6,
                               processor=JointAttnProcessor2_0()),
        "flux_double": FluxAttention(query_dim=80, heads=2, dim_head=40, out_dim=80, added_kv_proj_dim=80, bias=True,
                                     context_pre_only=False, eps=1e-6),
        "flux_single": FluxAttention(query_dim=80, heads=2, dim_head=40, out_dim=80, bias=True, pre_only=True,
                                     eps=1e-6, elementwise_affine=False),
        "sd3_layer_norm": Attention(**joint, qk_norm="layer_norm", processor=JointAttnProcessor2_0()),
        "across_heads": Attention(query_dim=48, heads=2, kv_heads=2, dim_head=24, qk_norm="rms_norm_across_heads",
                                  processor=JointAttnProcessor2_0()),
        "users_processor": FluxAttention(query_dim=80, heads=2, dim_head=40, out_dim=80, bias=True, pre_only=True,
                                         processor=_UsersFluxProcessor()),
        # fuse_qkv_projections(): Flux's processor then uses the packed layers (to_qkv, to_added_qkv)
        "flux_fused_projections": FluxAttention(query_dim=80, heads=2, dim_head=40, out_dim=80, added_kv_proj_dim=80,
                                                bias=True, context_pre_only=False, eps=1e-6),
    }))


def _rope(tokens, dim, seed):
    angles = torch.rand(tokens, dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _zoo_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {"sd3_joint": dict(hidden_states=rand(3, 9, 48), encoder_hidden_states=rand(3, 7, 48)),
            "sd3_last": dict(hidden_states=rand(3, 9, 48), encoder_hidden_states=rand(3, 7, 48)),
            "sd3_attn2": dict(hidden_states=rand(3, 9, 48)),
            "flux_double": dict(hidden_states=rand(3, 9, 80), encoder_hidden_states=rand(3, 7, 80),
                                image_rotary_emb=_rope(16, 40, 5)),
            "flux_single": dict(hidden_states=rand(1, 11, 80), image_rotary_emb=_rope(11, 40, 6)),
            "flux_fused_projections": dict(hidden_states=rand(2, 5, 80), encoder_hidden_states=rand(2, 3, 80),
                                           image_rotary_emb=_rope(8, 40, 7))}


def _call(attn, inputs, dtype):
    return attn(**{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})


@pytest.mark.parametrize("backend_name", ["cpu", "triton-interp", "reference"])
def test_attention_processor_equals_diffusers(backend_name, monkeypatch):
    be, _ = setup_backend(backend_name, None, monkeypatch)
    zoo = _attention_zoo()
    zoo["flux_fused_projections"].fuse_projections()
    with torch.no_grad():  # packed layers that differ from to_q/k/v: which ones run shows
        for layer in (zoo["flux_fused_projections"].to_qkv, zoo["flux_fused_projections"].to_added_qkv):
            layer.weight.mul_(1.5)
    originals = {name: attn.processor for name, attn in zoo.items()}
    inputs = _zoo_inputs()
    with torch.no_grad():
        ref = {name: _call(copy.deepcopy(zoo[name]).double(), x, torch.float64) for name, x in inputs.items()}
    fastdiff.optimize(zoo, backend=be)
    fused = {name for name, attn in zoo.items() if isinstance(attn.processor, FastdiffJointAttnProcessor)}
    assert fused == set(inputs)
    assert all(zoo[name].processor is originals[name] for name in set(zoo) - fused)
    why = dict(fastdiff.optimize_report(zoo).not_replaced)
    assert "LayerNorm" in why["sd3_layer_norm"] and "_UsersFluxProcessor" in why["users_processor"]
    assert "each head's 24 features" in why["across_heads"]
    with torch.no_grad():
        for name, x in inputs.items():
            out = _call(zoo[name], x, torch.float32)
            outs, refs = (out, ref[name]) if isinstance(out, tuple) else ((out,), (ref[name],))
            assert len(outs) == len(refs)
            for o, r in zip(outs, refs):
                assert_close(o, r, torch.float32, what=name)


def test_bad_calls_are_refused_before_the_attention():
    zoo = fastdiff.optimize(_attention_zoo(), backend="reference")
    x, ctx = torch.randn(1, 4, 80), torch.randn(1, 3, 80)
    with pytest.raises(ValueError, match="attention_mask"):
        zoo["flux_double"](x, ctx, attention_mask=torch.ones(1, 7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="image_rotary_emb"):
        zoo["flux_double"](x, ctx, image_rotary_emb=_rope(5, 40, 1))  # 7 tokens, rope for 5
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        zoo["flux_single"](x, ctx)

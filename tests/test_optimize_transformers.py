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
from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero,  # noqa: E402
                                            AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX)
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor  # noqa: E402

from fastdiff.integrations.diffusers.adaln import FusedAdaLN  # noqa: E402
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
    assert any(isinstance(m, FusedAdaLN) for m in opt.modules())
    assert not any(isinstance(m, FusedAdaLN) for m in model.modules())


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
    adaln_before = {n: type(m).__name__ for n, m in model.named_modules() if "AdaLayerNorm" in type(m).__name__}
    fastdiff.optimize(model, backend="reference")
    rep = fastdiff.optimize_report(model)
    assert {name: id(p) for name, p in model.named_parameters()} == params
    names = dict(model.named_modules())
    attns = [n for n, m in names.items() if isinstance(m, (Attention, FluxAttention))]
    assert attns and all(isinstance(names[n].processor, FastdiffJointAttnProcessor) for n in attns)
    assert {n: names[n].original.__name__ for n in adaln_before if isinstance(names[n], FusedAdaLN)} == adaln_before
    reported = rep.modules()
    assert len(reported) == len(set(reported))
    assert sorted(n for n, _ in rep.replaced) == sorted(attns + list(adaln_before)) and not rep.fused
    assert all("fastdiff::layer_norm_modulate" in w for n, w in rep.replaced if n in adaln_before)
    plain_norms = [n for n, m in names.items() if type(m) is nn.LayerNorm and not m.elementwise_affine
                   and not any(n.startswith(a + ".") for a in adaln_before)]
    why = dict(rep.not_replaced)
    assert sorted(why) == sorted(plain_norms) and plain_norms
    assert all("adaLN" in w and "runs as in diffusers" in w for w in why.values())
    replaced = dict(rep.replaced)
    attn_text = [replaced[n] for n in attns]
    if model_name != "sd3":
        assert all("q/k RMSNorm" in w for w in attn_text)
    assert all(("rotary" in w) == (model_name == "flux") for w in attn_text)


@pytest.fixture
def attention_calls(monkeypatch):
    calls = collections.Counter()
    real = FD.fused_qkv_attention

    def spy(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    for name in ("qkv_attention", "layer_norm_modulate"):
        monkeypatch.setattr(FD, f"fused_{name}", spy(name, getattr(FD, f"fused_{name}")))
    return calls


def _modulations(model):
    """fastdiff::layer_norm_modulate calls per forward: one per fused adaLN module, two for SD3.5's
    SD35AdaLayerNormZeroX (attn and attn2)."""
    return sum(2 if m.original is SD35AdaLayerNormZeroX else 1 for m in model.modules() if isinstance(m, FusedAdaLN))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_inference_runs_the_fused_attention(model_name, mode, attention_calls, monkeypatch):
    be, _ = setup_backend("cpu", None, monkeypatch)
    model = fastdiff.optimize(MODELS[model_name](), backend=be)
    with getattr(torch, mode)():
        out = _run(model, _inputs(model))
    assert not out.requires_grad
    assert attention_calls["qkv_attention"] == len(_joint_attentions(model))
    assert attention_calls["layer_norm_modulate"] == _modulations(model) > 0


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
    assert attention_calls["layer_norm_modulate"] == _modulations(model) > 0
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


def _adaln_zoo():
    """diffusers' adaLN modules at awkward widths (C = 37, 24, 1), DiT's AdaLayerNormZero with
    its own label embedding, and two that keep the original (an fp32 LayerNorm, an affine one)."""
    torch.manual_seed(1)
    return pipes.randomise(nn.ModuleDict({
        "zero": AdaLayerNormZero(37),
        "zero_dit": AdaLayerNormZero(24, num_embeddings=5),
        "single": AdaLayerNormZeroSingle(37),
        "sd35_x": SD35AdaLayerNormZeroX(24),
        "continuous": AdaLayerNormContinuous(37, 16, elementwise_affine=False, eps=1e-6),
        "continuous_c1": AdaLayerNormContinuous(1, 16, elementwise_affine=False, eps=1e-5, bias=False),
        "fp32_layer_norm": AdaLayerNormZero(24, norm_type="fp32_layer_norm"),
        "affine": AdaLayerNormContinuous(37, 16, elementwise_affine=True, eps=1e-6),
    }))


def _adaln_inputs(seed=6):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5

    return {"zero": (rand(3, 5, 37),), "single": (rand(1, 1, 37), rand(1, 37)),
            "zero_dit": (rand(2, 7, 24), torch.tensor([0.3, 0.9], dtype=torch.float64), torch.tensor([1, 4])),
            "sd35_x": (rand(3, 4, 24), rand(3, 24)), "continuous": (rand(3, 5, 37), rand(3, 16)),
            "continuous_c1": (rand(2, 3, 1), rand(2, 16))}


def _adaln_call(name, module, args, dtype):
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    if name == "zero":
        return module(args[0], emb=torch.randn(args[0].shape[0], 37, generator=torch.Generator().manual_seed(2),
                                                dtype=torch.float64).to(dtype))
    if name == "zero_dit":
        return module(args[0], timestep=args[1], class_labels=args[2], hidden_dtype=dtype)
    return module(*args)


@pytest.mark.parametrize("backend_name", ["cpu", "triton-interp", "reference"])
def test_adaln_modules_equal_diffusers(backend_name, monkeypatch):
    """Every returned tensor (the modulated x, the gates, the MLP's shift and scale: diffusers'
    chunk order) equals diffusers' own module run in float64; unsupported norms keep theirs."""
    be, _ = setup_backend(backend_name, None, monkeypatch)
    zoo = _adaln_zoo()
    inputs = _adaln_inputs()
    with torch.no_grad():
        ref = {n: _adaln_call(n, copy.deepcopy(zoo[n]).double(), a, torch.float64) for n, a in inputs.items()}
    keys = list(zoo.state_dict())
    fastdiff.optimize(zoo, backend=be)
    assert list(zoo.state_dict()) == keys
    assert {n for n, m in zoo.items() if isinstance(m, FusedAdaLN)} == set(inputs)
    why = dict(fastdiff.optimize_report(zoo).not_replaced)
    assert "FP32LayerNorm" in why["fp32_layer_norm"] and "affine" in why["affine"]
    with torch.no_grad():
        for name, args in inputs.items():
            out, r = _adaln_call(name, zoo[name], args, torch.float32), ref[name]
            outs, refs = (out, r) if isinstance(out, tuple) else ((out,), (r,))
            assert len(outs) == len(refs)
            for o, rr in zip(outs, refs):
                assert o.dtype == torch.float32 and o.shape == rr.shape
                assert_close(o, rr, torch.float32, what=name)


def test_adaln_output_dtype_is_diffusers_promotion(monkeypatch):
    """bf16 x through an fp32 module: diffusers' result is fp32 (bf16 norm times fp32 scale)."""
    be, _ = setup_backend("cpu", None, monkeypatch)
    original = _adaln_zoo()["single"]
    fused = fastdiff.optimize(nn.ModuleDict({"m": copy.deepcopy(original)}), backend=be)["m"]
    x, emb = torch.randn(2, 3, 37).to(torch.bfloat16), torch.randn(2, 37)
    with torch.no_grad():
        theirs, ours = original(x, emb), fused(x, emb)
        ref = copy.deepcopy(original).double()(x.double(), emb.double())
    for o, t, r in zip(ours, theirs, ref):
        assert o.dtype == t.dtype == torch.float32
        assert_close(o, r, torch.float32, what="bf16 x")


def test_adaln_on_a_backend_the_op_does_not_have_runs_eager_and_says_so():
    """optimize(backend="cuda"): fastdiff has no CUDA kernel for layer_norm_modulate (Triton is
    its GPU kernel), so the fused modules run diffusers' eager ops; the report names why."""
    zoo = _adaln_zoo()
    inputs = _adaln_inputs()
    with torch.no_grad():
        theirs = {n: _adaln_call(n, zoo[n], a, torch.float32) for n, a in inputs.items()}
    fastdiff.optimize(zoo, backend="cuda")
    why = dict(fastdiff.optimize_report(zoo).not_replaced)
    assert all("'cuda', which fastdiff::layer_norm_modulate does not have" in why[n] for n in inputs)
    with torch.no_grad():
        for name, args in inputs.items():
            out = _adaln_call(name, zoo[name], args, torch.float32)
            for o, t in zip(*((out, theirs[name]) if isinstance(out, tuple) else ((out,), (theirs[name],)))):
                assert torch.equal(o, t), name

"""`fastdiff.optimize()` on diffusers models: tiny random-init UNet2DModel / UNet2DConditionModel
built from configs (never downloaded). The optimized model must give the original's output (within
the tolerance table, against the original run in float64), keep its parameters and state_dict
keys, report each module once, be idempotent, and keep autograd intact."""
import collections
import copy

import pytest
import torch
import torch.nn as nn

import fastdiff
from conftest import run_without_extension, setup_backend, require
from fastdiff.nn import functional as FD
from tolerances import assert_as_close_as, assert_close, rel_err

diffusers = require("diffusers", "diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from fastdiff.integrations.diffusers.models import FastdiffAttnProcessor, FusedResnetBlock2D  # noqa: E402

OP = "group_norm_silu"  # the compiled kernel the "cpu" backend needs
BATCH, CONTEXT_LEN, CONTEXT_DIM = 2, 7, 12


def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Zero-initialised layers (conv_out, attention out-projections) would hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def unet2d(**overrides) -> nn.Module:
    """Self-attention at the second level (Attention with group_norm, residual_connection)."""
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=8, attention_head_dim=8)
    torch.manual_seed(0)
    return _randomise(diffusers.UNet2DModel(**{**cfg, **overrides}))


def unet2d_condition() -> nn.Module:
    """SD-shaped: Transformer2DModel blocks with self- (attn1) and cross-attention (attn2)."""
    torch.manual_seed(0)
    return _randomise(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=CONTEXT_DIM, attention_head_dim=8))


MODELS = {"unet2d": unet2d, "unet2d-condition": unet2d_condition}


def _inputs(model, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    args = [torch.randn(BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype),
            torch.tensor([999.0, 17.0])]
    if isinstance(model, diffusers.UNet2DConditionModel):
        args.append(torch.randn(BATCH, CONTEXT_LEN, CONTEXT_DIM, generator=g).to(dtype))
    return args


def _run(model, args):
    return model(*args).sample


def _float64_reference(model, args):
    with torch.no_grad():
        return _run(copy.deepcopy(model).double(), [a.double() if a.is_floating_point() else a for a in args])


# (backend, model, memory format): the Triton interpreter takes ~20 s per call of the
# cross-attention U-Net, so it runs the self-attention one here and cross-attention in the
# single-module test below
EQUALITY_CASES = [("cpu", "unet2d", "contiguous_format"), ("cpu", "unet2d-condition", "contiguous_format"),
                  ("cpu", "unet2d-condition", "channels_last"), ("reference", "unet2d-condition", "contiguous_format"),
                  ("triton-interp", "unet2d", "contiguous_format")]


@pytest.mark.parametrize("backend_name,model_name,memory_format", EQUALITY_CASES)
def test_optimized_unet_equals_the_original_fp32(backend_name, model_name, memory_format, monkeypatch):
    be, _ = setup_backend(backend_name, OP, monkeypatch)
    model = MODELS[model_name]()
    args = _inputs(model)
    ref = _float64_reference(model, args)
    keys = list(model.state_dict())
    model = model.to(memory_format=getattr(torch, memory_format))
    args[0] = args[0].contiguous(memory_format=getattr(torch, memory_format))
    opt = fastdiff.optimize(model, backend=be, inplace=False)
    with torch.no_grad():
        assert_close(_run(opt, args), ref, torch.float32, what=f"{model_name} optimized")
        assert_close(_run(model, args), ref, torch.float32, what=f"{model_name} original (untouched copy)")
    assert list(opt.state_dict()) == keys
    assert not any(isinstance(m, (FusedResnetBlock2D, fastdiff.nn.GroupNormSiLU)) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_optimized_unet_in_half_precision(model_name, dtype, monkeypatch):
    """Every layer of a half-precision U-Net rounds, so diffusers' own run in that dtype is off
    float64 by many table rows already (measured up to 2e-3 fp16, 4.5e-2 bf16): the optimized
    model may be off by at most that plus one table tolerance."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    model = MODELS[model_name]()
    args = _inputs(model)
    ref = _float64_reference(model, args)
    half_args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        theirs = _run(half, half_args)
        assert_as_close_as(_run(fastdiff.optimize(half, backend=be), half_args), theirs, ref, dtype, what=model_name)


def test_what_is_fused_and_the_report():
    model = unet2d_condition()
    params = {name: p for name, p in model.named_parameters()}
    fastdiff.optimize(model, backend="reference")
    rep = fastdiff.optimize_report(model)
    # the parameters are the same objects under the same names
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params.items()}
    names = dict(model.named_modules())
    resnets = [n for n, m in names.items() if isinstance(m, FusedResnetBlock2D)]
    attns = [n for n, m in names.items() if isinstance(m, Attention)]
    assert len(resnets) == 8 and not any(type(m) is ResnetBlock2D for m in model.modules())
    assert len(attns) == 8 and all(isinstance(names[n].processor, FastdiffAttnProcessor) for n in attns)
    assert isinstance(model.conv_norm_out, fastdiff.nn.GroupNormSiLU) and model.conv_norm_out.silu
    assert isinstance(model.conv_act, nn.Identity)
    transformer_norms = [n for n, m in names.items() if isinstance(m, diffusers.models.Transformer2DModel)]
    assert all(isinstance(names[f"{n}.norm"], fastdiff.nn.GroupNormSiLU) for n in transformer_norms)
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # each module exactly once; everything fused here, nothing left
    reported = rep.modules()
    assert len(reported) == len(set(reported))
    assert set(resnets + attns + ["conv_norm_out"] + [f"{n}.norm" for n in transformer_norms]) == set(reported)
    assert not rep.not_replaced and not rep.fused
    assert str(rep).count("\n") == len(reported)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_optimize_twice_is_optimize_once(model_name, monkeypatch):
    be, _ = setup_backend("cpu", OP, monkeypatch)
    model = MODELS[model_name]()
    args = _inputs(model)
    once = fastdiff.optimize(copy.deepcopy(model), backend=be)
    twice = fastdiff.optimize(fastdiff.optimize(copy.deepcopy(model), backend=be), backend=be)
    assert fastdiff.optimize_report(once) == fastdiff.optimize_report(twice)
    assert [type(m) for m in once.modules()] == [type(m) for m in twice.modules()]
    with torch.no_grad():
        assert torch.equal(_run(once, args), _run(twice, args))


def test_unsupported_blocks_are_left_and_reported(monkeypatch):
    """scale_shift ResNet blocks stay diffusers' own (GroupNorms included); the output still matches."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    model = unet2d(resnet_time_scale_shift="scale_shift")
    args = _inputs(model)
    ref = _float64_reference(model, args)
    fastdiff.optimize(model, backend=be)
    rep = fastdiff.optimize_report(model)
    left = [n for n, m in model.named_modules() if type(m) is ResnetBlock2D]
    assert len(left) == 8 and not any(isinstance(m, FusedResnetBlock2D) for m in model.modules())
    assert all(type(m.norm1) is nn.GroupNorm for n, m in model.named_modules() if n in left)
    why = dict(rep.not_replaced)
    assert sorted(why) == sorted(left) and all("scale_shift" in why[n] for n in left)
    assert len(rep.modules()) == len(set(rep.modules()))
    with torch.no_grad():
        assert_close(_run(model, args), ref, torch.float32, what="scale_shift U-Net optimized")


def test_output_scale_factors(monkeypatch):
    """ResNet blocks with output_scale_factor != 1 (the mid block's here) divide; at 1 the division is skipped."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    model = unet2d(mid_block_scale_factor=1.5)
    args = _inputs(model)
    ref = _float64_reference(model, args)
    fastdiff.optimize(model, backend=be)
    assert {m.output_scale_factor for m in model.modules() if isinstance(m, FusedResnetBlock2D)} == {1.0, 1.5}
    with torch.no_grad():
        assert_close(_run(model, args), ref, torch.float32, what="mid_block_scale_factor=1.5")


class _UsersProcessor(AttnProcessor2_0):
    """A processor subclass (as LoRA / IP-Adapter processors are): may change the computation."""


def _attention_zoo():
    """Attention modules as diffusers configures them, three fusable, four not."""
    torch.manual_seed(0)
    kw = dict(query_dim=16, heads=2, dim_head=8)
    return _randomise(nn.ModuleDict({
        # UNet2DModel's attention block: GroupNorm, biases, residual, output rescale
        "spatial_self": Attention(**kw, norm_num_groups=4, bias=True, residual_connection=True,
                                  rescale_output_factor=2.0),
        "self": Attention(**kw),
        "cross": Attention(**kw, cross_attention_dim=CONTEXT_DIM, bias=True),
        "norm_cross": Attention(**kw, cross_attention_dim=CONTEXT_DIM, cross_attention_norm="layer_norm"),
        "qk_norm": Attention(**kw, qk_norm="layer_norm"),
        "kv_heads": Attention(**kw, kv_heads=1),
        "users_processor": Attention(**kw, processor=_UsersProcessor()),
    }))


def _attention_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"spatial_self": (torch.randn(3, 16, 3, 5, generator=g), None),  # odd batch, odd H*W
            "self": (torch.randn(3, 9, 16, generator=g), None),
            "cross": (torch.randn(3, 9, 16, generator=g), torch.randn(3, CONTEXT_LEN, CONTEXT_DIM, generator=g))}


@pytest.mark.parametrize("backend_name", ["cpu", "triton-interp", "reference"])
def test_attention_processor_equals_diffusers(backend_name, monkeypatch):
    be, _ = setup_backend(backend_name, OP, monkeypatch)
    zoo = _attention_zoo()
    originals = {name: attn.processor for name, attn in zoo.items()}
    ref = {}
    with torch.no_grad():
        for name, (x, ctx) in _attention_inputs().items():
            ref[name] = copy.deepcopy(zoo[name]).double()(x.double(), None if ctx is None else ctx.double())
    fastdiff.optimize(zoo, backend=be)
    rep = fastdiff.optimize_report(zoo)
    fused = {name for name, attn in zoo.items() if isinstance(attn.processor, FastdiffAttnProcessor)}
    assert fused == {"spatial_self", "self", "cross"}
    for name in set(zoo) - fused:
        assert zoo[name].processor is originals[name]
    why = dict(rep.not_replaced)
    assert "norm_cross" in why["norm_cross"] and "q/k norms" in why["qk_norm"] and "kv_heads" in why["kv_heads"]
    assert "_UsersProcessor" in why["users_processor"]
    with torch.no_grad():
        for name, (x, ctx) in _attention_inputs().items():
            assert_close(zoo[name](x, ctx), ref[name], torch.float32, what=name)
    with pytest.raises(ValueError, match="attention_mask"):
        zoo["self"](torch.randn(1, 4, 16), attention_mask=torch.ones(1, 4, 4))


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of each fused op made through fastdiff.nn.functional."""
    calls = collections.Counter()
    for name in ("fused_group_norm_silu", "fused_qkv_attention", "fused_kv_attention", "fused_linear_residual"):
        def spy(*args, _real=getattr(FD, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(FD, name, spy)
    return calls


def _expected_calls(model):
    mods = list(model.modules())
    attns = [m for m in mods if isinstance(m, Attention)]
    self_attn = sum(not m.is_cross_attention for m in attns)
    return {"fused_group_norm_silu": sum(isinstance(m, fastdiff.nn.GroupNormSiLU) for m in mods),
            "fused_qkv_attention": self_attn, "fused_kv_attention": len(attns) - self_attn,
            "fused_linear_residual": sum(m.residual_connection for m in attns)}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_inference_runs_the_fused_ops(model_name, mode, fused_calls, monkeypatch):
    be, _ = setup_backend("cpu", OP, monkeypatch)
    model = fastdiff.optimize(MODELS[model_name](), backend=be)
    args = _inputs(model)
    with getattr(torch, mode)():
        out = _run(model, args)
    assert not out.requires_grad
    assert dict(fused_calls) == {k: v for k, v in _expected_calls(model).items() if v}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_gradients_equal_the_originals(model_name, fused_calls, monkeypatch):
    """With grad enabled the forward stays fused and backward goes through the eager twins:
    every parameter and the input get the original model's gradients, none is dropped."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = MODELS[model_name]()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    args = _inputs(original)
    weight = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(9))

    def grads(m):
        x = args[0].clone().requires_grad_()
        out = _run(m, [x] + args[1:])
        leaves = [x] + list(m.parameters())
        return out, torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)

    out_ref, g_ref = grads(original)
    out, g = grads(model)
    assert dict(fused_calls) == {k: v for k, v in _expected_calls(model).items() if v}
    assert out.grad_fn is not None
    assert [t is None for t in g] == [t is None for t in g_ref]
    assert sum(t is not None for t in g) > len(g) // 2
    flat = [torch.cat([t.flatten() for t in gs if t is not None]) for gs in (g, g_ref)]
    assert rel_err(flat[0], flat[1]) < 1e-5  # fp32 table: the fused forward's rounding, propagated
    assert rel_err(out.detach(), out_ref.detach()) < 1e-5


def test_fused_resnet_block_checks_temb():
    block = fastdiff.optimize(nn.ModuleList([ResnetBlock2D(in_channels=8, temb_channels=6, groups=4)]),
                              backend="reference")[0]
    assert isinstance(block, FusedResnetBlock2D)
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(1, 8, 4, 4), None)
    no_temb = fastdiff.optimize(nn.ModuleList([ResnetBlock2D(in_channels=8, temb_channels=None, groups=4)]),
                                backend="reference")[0]
    with pytest.raises(ValueError, match="temb"):
        no_temb(torch.randn(1, 8, 4, 4), torch.randn(1, 8))


def test_a_diffusers_block_as_the_model_itself():
    """An Attention gets the processor in place; a ResnetBlock2D cannot replace itself: left whole, said why."""
    attn = fastdiff.optimize(Attention(query_dim=16, heads=2, dim_head=8), backend="reference")
    assert isinstance(attn.processor, FastdiffAttnProcessor)
    assert [name for name, _ in fastdiff.optimize_report(attn).replaced] == ["(root)"]
    block = fastdiff.optimize(ResnetBlock2D(in_channels=8, temb_channels=6, groups=4), backend="reference")
    assert type(block) is ResnetBlock2D and type(block.norm1) is nn.GroupNorm
    (name, why), = fastdiff.optimize_report(block).not_replaced
    assert name == "(root)" and "optimize its parent" in why


def test_the_core_does_not_import_diffusers():
    run_without_extension(
        "import sys, torch, fastdiff\n"
        "m = fastdiff.optimize(torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU()), backend='reference')\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
        "print('ok')\n")


# --- the packed QKV / KV weights follow every change of the parameters ------------------------

def _projection_params(model):
    """{name: parameter} of every attention's to_q / to_k / to_v."""
    return {n: p for n, p in model.named_parameters() if any(f".{s}." in n for s in ("to_q", "to_k", "to_v"))}


def _delta(p, seed):
    return 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p.dtype)


def _each_projection(fn):
    """A change applied to every q/k/v parameter of a model, by name (the same on both models)."""
    def change(model):
        with torch.no_grad():
            for i, (name, p) in enumerate(sorted(_projection_params(model).items())):
                fn(model, name, p, _delta(p, i))
    return change


def _set(model, name, value):
    module_name, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(module_name), attr, value)


def _fresh_state(model):
    return {k: v + _delta(v, 7) if k in _projection_params(model) else v.clone() for k, v in model.state_dict().items()}


CHANGES = {  # how weights are changed in practice
    "add_": _each_projection(lambda m, n, p, d: p.add_(d)),
    "data+=": _each_projection(lambda m, n, p, d: p.data.__iadd__(d)),  # peft's merge: base.weight.data += delta
    "safe_merge": _each_projection(lambda m, n, p, d: setattr(p, "data", p.data.clone() + d)),  # peft safe_merge
    "new_parameter": _each_projection(lambda m, n, p, d: _set(m, n, nn.Parameter(p + d))),  # fuse_lora-style
    "load_state_dict": lambda m: m.load_state_dict(_fresh_state(m)),
    "load_state_dict_assign": lambda m: m.load_state_dict(_fresh_state(m), assign=True),
}


def _count_cats(model, args):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cats(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Cats.n += func.overloadpacket is torch.ops.aten.cat
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Cats():
        _run(model, args)
    return Cats.n


def test_projections_are_views_of_one_packed_buffer(monkeypatch):
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = unet2d_condition()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        packed = [attn.to_k, attn.to_v] if attn.is_cross_attention else [attn.to_q, attn.to_k, attn.to_v]
        assert len({lin.weight.untyped_storage().data_ptr() for lin in packed}) == 1
        assert all(lin.weight.is_contiguous() for lin in packed)
    args = _inputs(model)
    assert _count_cats(model, args) == _count_cats(original, args)  # the U-Net's own skip concatenations only


@pytest.mark.parametrize("change", list(CHANGES))
def test_weight_changes_take_effect_on_the_next_call(change, monkeypatch):
    """Each change, made after the optimized model has run, to the optimized model and to an
    unoptimized copy: the next call of each agrees (and differs from before the change)."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = unet2d_condition()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    args = _inputs(model)
    with torch.no_grad():
        before = _run(model, args)
    for m in (original, model):
        CHANGES[change](m)
    with torch.no_grad():
        ref, out = _run(original, args), _run(model, args)
    assert rel_err(ref, before) > 1e-2, "the change does not move the output: the test could not fail"
    assert_close(out, ref, torch.float32, what=f"after {change}")


def test_lora_fuse_and_unfuse_and_dtype_moves(monkeypatch):
    """peft's merge and unmerge (in place, through .data), then .to(float16) and back: each takes
    effect on the next call."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = unet2d_condition()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    args = _inputs(model)
    fuse = _each_projection(lambda m, n, p, d: p.data.__iadd__(d))
    unfuse = _each_projection(lambda m, n, p, d: p.data.__isub__(d))
    with torch.no_grad():
        plain = _run(model, args)
        for m in (original, model):
            fuse(m)
        assert_close(_run(model, args), _run(original, args), torch.float32, what="fused LoRA")
        for m in (original, model):
            unfuse(m)
        assert_close(_run(model, args), plain, torch.float32, what="unfused LoRA")
        ref = _float64_reference(original, args)
        half_args = [a.half() if a.is_floating_point() else a for a in args]
        for m in (original, model):
            m.to(torch.float16)
        assert all(p.dtype == torch.float16 for p in _projection_params(model).values())
        assert_as_close_as(_run(model, half_args), _run(original, half_args), ref, torch.float16, what="float16")
        for m in (original, model):
            m.to(torch.float32)
        assert_close(_run(model, args), _run(original, args), torch.float32, what="back to float32")


def test_save_pretrained_round_trip(tmp_path, monkeypatch):
    """The packed views save (safetensors) and load back into a plain diffusers U-Net."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = unet2d_condition()
    model = fastdiff.optimize(copy.deepcopy(original), backend=be)
    args = _inputs(model)
    for m in (original, model):
        CHANGES["data+="](m)
    model.save_pretrained(tmp_path)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    with torch.no_grad():
        assert torch.equal(_run(loaded, args), _run(original, args))


def test_channels_last_end_to_end(monkeypatch):
    """optimize(memory_format=channels_last) makes the convolutions NHWC; sampled from channels_last
    noise, every U-Net call gets and returns NHWC maps and the sample stays NHWC: equal to the
    contiguous run."""
    be, _ = setup_backend("cpu", OP, monkeypatch)
    original = unet2d_condition()
    flat = fastdiff.optimize(original, backend=be, inplace=False)
    nhwc = fastdiff.optimize(original, backend=be, inplace=False, memory_format=torch.channels_last)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in nhwc.modules()
               if isinstance(m, nn.Conv2d))
    x, _, ctx = _inputs(original)
    seen = []

    def denoiser(unet):
        def call(x, t, encoder_hidden_states):
            out = unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
            seen.append((unet is nhwc, x.is_contiguous(memory_format=torch.channels_last),
                         out.is_contiguous(memory_format=torch.channels_last)))
            return out
        return call

    kw = dict(guidance_scale=7.5, cond={"encoder_hidden_states": ctx}, steps=3, backend=be,
              uncond={"encoder_hidden_states": torch.zeros_like(ctx)})
    ref = fastdiff.sample(denoiser(flat), x, **kw)
    out = fastdiff.sample(denoiser(nhwc), x.contiguous(memory_format=torch.channels_last), **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(x_cl and out_cl for is_nhwc, x_cl, out_cl in seen if is_nhwc) and len(seen) == 6
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)  # fp32: the convolutions' summation order differs
    back = fastdiff.optimize(nhwc, backend=be, memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in back.modules() if isinstance(m, nn.Conv2d))

"""fastdiff.nn: the eager U-Net modules (shapes, parameter counts, float64 equivalence with
hand-written references, state_dict round trips)."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.nn import (AttentionBlock, Downsample, GroupNormSiLU, ResBlock, UNet, UNetConfig, Upsample,
                         timestep_embedding)

from tolerances import assert_close

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Fresh random values everywhere (zero-initialised layers would make tests trivial)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


# --- GroupNormSiLU ----------------------------------------------------------------------

@pytest.mark.parametrize("C,G", [(12, 1), (12, 4), (12, 12), (32, 8)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_add,with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_group_norm_silu_matches_nn_group_norm(C, G, silu, with_add, with_residual):
    g = _gen(C * 100 + G)
    B, H, W = 3, 5, 7  # odd batch, odd H*W
    x = torch.randn(B, C, H, W, generator=g, dtype=F64) * 2 + 0.5
    add = torch.randn(B, C, generator=g, dtype=F64) if with_add else None
    res = torch.randn(B, C, H, W, generator=g, dtype=F64) if with_residual else None
    ours = GroupNormSiLU(C, G, eps=1e-5, silu=silu).to(F64)
    ref = nn.GroupNorm(G, C, eps=1e-5).to(F64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(C, generator=g, dtype=F64))
        ref.bias.copy_(torch.randn(C, generator=g, dtype=F64))
    ours.load_state_dict(ref.state_dict())  # same parameter names as nn.GroupNorm
    expected = ref(x + add[:, :, None, None] if with_add else x)
    if silu:
        expected = F.silu(expected)
    if with_residual:
        expected = expected + res
    assert_close(ours(x, add=add, residual=res), expected, F64, what="GroupNormSiLU")


def test_group_norm_silu_errors():
    with pytest.raises(ValueError, match="divisible"):
        GroupNormSiLU(10, 4)
    m = GroupNormSiLU(8, 4)
    with pytest.raises(ValueError, match="add"):
        m(torch.randn(2, 8, 3, 3), add=torch.randn(2, 8, 1))


# --- attention ---------------------------------------------------------------------------

def _softmax_attention(q, k, v, head_dim):
    """Hand-written multi-head attention on (B, N, C) tensors, float64."""
    B, N, C = q.shape
    L = k.shape[1]
    h = C // head_dim
    q = q.reshape(B, N, h, head_dim).permute(0, 2, 1, 3)
    k = k.reshape(B, L, h, head_dim).permute(0, 2, 1, 3)
    v = v.reshape(B, L, h, head_dim).permute(0, 2, 1, 3)
    s = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return (p @ v).permute(0, 2, 1, 3).reshape(B, N, C)


def _reference_attention_block(blk: AttentionBlock, x, context=None):
    B, C, H, W = x.shape
    d = blk.head_dim

    def gn(norm, y):
        return F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps).flatten(2).transpose(1, 2)

    tok = x.flatten(2).transpose(1, 2)
    t = gn(blk.norm, x)
    Wqkv, bqkv = blk.qkv.weight, blk.qkv.bias
    q = t @ Wqkv[:C].T + bqkv[:C]
    k = t @ Wqkv[C:2 * C].T + bqkv[C:2 * C]
    v = t @ Wqkv[2 * C:].T + bqkv[2 * C:]
    tok = tok + _softmax_attention(q, k, v, d) @ blk.proj_out.weight.T + blk.proj_out.bias
    if context is not None:
        t = gn(blk.norm_cross, tok.transpose(1, 2).reshape(B, C, H, W))
        q = t @ blk.to_q.weight.T + blk.to_q.bias
        kv = context @ blk.to_kv.weight.T + blk.to_kv.bias
        o = _softmax_attention(q, kv[..., :C], kv[..., C:], d)
        tok = tok + o @ blk.proj_out_cross.weight.T + blk.proj_out_cross.bias
    return tok.transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize("C,head_dim,groups", [(64, 64, 32), (80, 40, 8), (160, 80, 32), (160, 160, 1)])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_block_matches_handwritten_softmax(C, head_dim, groups, cross):
    g = _gen(C + head_dim + cross)
    B, H, W, L, D = 3, 3, 5, 7, 24
    blk = AttentionBlock(C, head_dim=head_dim, context_dim=D if cross else None, groups=groups)
    blk = _randomize(blk.to(F64), seed=C + head_dim)
    assert blk.num_heads == C // head_dim
    x = torch.randn(B, C, H, W, generator=g, dtype=F64)
    ctx = torch.randn(B, L, D, generator=g, dtype=F64) if cross else None
    with torch.no_grad():
        assert_close(blk(x, ctx), _reference_attention_block(blk, x, ctx), F64, what="AttentionBlock")


def test_attention_block_errors():
    with pytest.raises(ValueError, match="exactly one"):
        AttentionBlock(64)
    with pytest.raises(ValueError, match="head_dim"):
        AttentionBlock(64, head_dim=48)
    blk = AttentionBlock(32, num_heads=2, context_dim=16, groups=8)
    with pytest.raises(ValueError, match="context"):
        blk(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match="context"):
        blk(torch.randn(2, 32, 4, 4), torch.randn(2, 5, 8))


# --- ResBlock, resampling, embeddings ----------------------------------------------------------

@pytest.mark.parametrize("cin,cout", [(16, 16), (16, 32)])
def test_resblock_matches_composition(cin, cout):
    g = _gen(cin + cout)
    blk = _randomize(ResBlock(cin, cout, 24, groups=8).to(F64), seed=cout)
    x = torch.randn(2, cin, 6, 5, generator=g, dtype=F64)
    temb = torch.randn(2, 24, generator=g, dtype=F64)
    h = F.silu(F.group_norm(x, 8, blk.norm1.weight, blk.norm1.bias, 1e-5))
    h = F.conv2d(h, blk.conv1.weight, blk.conv1.bias, padding=1)
    h = h + (F.silu(temb) @ blk.temb_proj.weight.T + blk.temb_proj.bias)[:, :, None, None]
    h = F.silu(F.group_norm(h, 8, blk.norm2.weight, blk.norm2.bias, 1e-5))
    h = F.conv2d(h, blk.conv2.weight, blk.conv2.bias, padding=1)
    skip = x if cin == cout else F.conv2d(x, blk.skip.weight, blk.skip.bias)
    with torch.no_grad():
        assert_close(blk(x, temb), skip + h, F64, what="ResBlock")
    assert isinstance(blk.skip, nn.Identity) == (cin == cout)


def test_resample_shapes():
    x = torch.randn(2, 8, 6, 10)
    assert Downsample(8)(x).shape == (2, 8, 3, 5)
    assert Downsample(8, with_conv=False)(x).shape == (2, 8, 3, 5)
    assert Upsample(8)(x).shape == (2, 8, 12, 20)
    assert Upsample(8, with_conv=False)(x).shape == (2, 8, 12, 20)


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.5, 999.0], dtype=torch.float32)
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8) and e.dtype == torch.float32
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)], dtype=F64)
    ref = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], 1)
    assert torch.allclose(e.double(), ref, atol=1e-4)
    assert timestep_embedding(t, 7).shape == (3, 7)
    # fractional timesteps give distinct embeddings
    assert not torch.allclose(timestep_embedding(torch.tensor([1.0]), 16), timestep_embedding(torch.tensor([1.5]), 16))


# --- UNet ------------------------------------------------------------------------------------

def test_cifar_config_param_count_and_shape():
    cfg = UNetConfig.cifar()
    assert cfg.channels == (128, 256, 256, 256) and cfg.attention_levels == (1,)
    m = UNet(cfg).eval()
    n = m.count_parameters()
    assert 35.0e6 <= n <= 36.5e6, n  # DDPM's CIFAR-10 model: 35.7M
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 32), torch.tensor([10.5]))
    assert out.shape == (1, 3, 32, 32)


def test_digits_config_shape_and_class_labels():
    cfg = UNetConfig.digits(zero_init=False)
    m = UNet(cfg).eval()
    assert m.null_class == cfg.num_classes == 10
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0.0, 17.25, 999.0])
    with torch.no_grad():
        out = m(x, t, class_labels=torch.tensor([0, 9, 10]))
        assert out.shape == x.shape and torch.isfinite(out).all()
        # no labels = the null label
        assert torch.equal(m(x, t), m(x, t, class_labels=torch.full((3,), 10)))
        assert not torch.allclose(m(x, t, class_labels=torch.tensor([1, 2, 3])), m(x, t))
    with pytest.raises(ValueError, match="class_labels"):
        m(x, t, class_labels=torch.tensor([0, 1, 11]))
    with pytest.raises(ValueError, match="t:"):
        m(x, torch.zeros(2))
    with pytest.raises(ValueError, match="context"):
        m(x, t, context=torch.randn(3, 4, 8))


def test_sd15_like_reduced_width_cross_attention():
    full = UNetConfig.sd15_like()
    assert full.channels == (320, 640, 1280, 1280) and full.context_dim == 768 and full.context_length == 77
    assert {c // full.num_heads for c in full.channels} == {40, 80, 160}  # head dims
    cfg = UNetConfig.sd15_like(base_channels=32, context_dim=48, sample_size=16)
    m = UNet(cfg).eval()
    g = _gen(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 48, generator=g)
    with torch.no_grad():
        out = m(x, torch.tensor([3.0, 700.0]), context=ctx)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, m(x, torch.tensor([3.0, 700.0]), context=ctx * 2))
    with pytest.raises(ValueError, match="context"):
        m(x, torch.tensor([3.0, 700.0]))


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(head_dim=32, num_heads=2)
    cfg = UNetConfig.digits()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_state_dict_round_trip():
    cfg = UNetConfig.digits(zero_init=False)
    a = _randomize(UNet(cfg), seed=5, std=0.05).eval()
    b = UNet(cfg).eval()
    try:  # safetensors (how the bundled weights ship) is in the `demo` extra, not a core dependency
        from safetensors.torch import load, save
    except ImportError:
        b = None
    else:
        b.load_state_dict(load(save({k: v.contiguous() for k, v in a.state_dict().items()})))
    # torch.save round trip, with strict key matching
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = UNet(cfg).eval()
    c.load_state_dict(torch.load(buf), strict=True)
    g = _gen(11)
    x = torch.randn(2, 1, 16, 16, generator=g)
    t = torch.tensor([5.0, 500.0])
    y = torch.tensor([3, 10])
    with torch.no_grad():
        ref = a(x, t, class_labels=y)
        if b is not None:
            assert torch.equal(b(x, t, class_labels=y), ref)
        assert torch.equal(c(x, t, class_labels=y), ref)
    # the parameter names a fused implementation must keep
    keys = set(a.state_dict())
    for k in ("down.0.resnets.0.norm1.weight", "down.0.resnets.0.temb_proj.weight", "mid_attn.qkv.weight",
              "mid_attn.proj_out.bias", "up.0.resnets.0.skip.weight", "norm_out.bias", "class_embed.weight",
              "time_embed.linear_1.weight"):
        assert k in keys, k

"""The fused U-Net equals its eager twin, and `fastdiff.optimize()` leaves a model's output
unchanged. fp32 bound: the fused GroupNorm/attention differ from the eager ops by reordered
fp32 sums (~1e-7 relative per op); a dozen such layers with convolutions in between stay far
below 1e-5 x 10 = 1e-4."""
import pytest
import torch
import torch.nn as nn

import fastdiff
from fastdiff.nn import UNet, UNetConfig
from tolerances import rel_err

OP = "group_norm_silu"  # the compiled kernel the conftest `backend` fixture checks for "cpu"/"cuda"
TOL = 1e-4


def _inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + cfg.sample_shape, generator=g)
    t = torch.tensor([999.0, 17.0][:batch])
    kw = {}
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([3, cfg.num_classes][:batch])
    if cfg.context_dim:
        kw["context"] = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, kw


def _randomise(model, seed=1):
    """Zero-initialised output layers would hide differences: give every parameter noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# SD-shaped but tiny: cross-attention, several heads, head_dim 8
SD15_TINY = UNetConfig.sd15_like(base_channels=16, channel_mults=(1, 2), attention_levels=(0, 1), num_heads=2,
                                 groups=8, sample_size=8, context_dim=12, num_res_blocks=1)


@pytest.mark.parametrize("config", [UNetConfig.digits(), SD15_TINY], ids=["digits", "sd15-tiny"])
def test_fused_unet_equals_its_eager_twin(backend, config):
    be, device = backend
    torch.manual_seed(0)
    model = _randomise(UNet(config)).eval().to(device)
    x, t, kw = _inputs(config)
    x, t = x.to(device), t.to(device)
    kw = {k: v.to(device) for k, v in kw.items()}
    with torch.no_grad():
        eager = model(x, t, **kw)
        fused = model.set_backend(be)(x, t, **kw)
        model.set_backend(None)
        again = model(x, t, **kw)
    assert torch.equal(eager, again)  # switching back restores the eager twin exactly
    assert rel_err(fused.cpu(), eager.cpu()) < TOL


def test_fused_unet_backward_equals_its_eager_twins(backend):
    """The fused kernels have no backward: with autograd recording the forward stays fused and
    backward differentiates the eager twin (recomputed), so no gradient is lost or changed."""
    be, device = backend
    torch.manual_seed(0)
    model = _randomise(UNet(SD15_TINY)).to(device)
    x, t, kw = _inputs(SD15_TINY)
    x, t = x.to(device).requires_grad_(), t.to(device)
    kw = {k: v.to(device).requires_grad_() for k, v in kw.items()}
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)

    def grads(b):
        model.set_backend(b)
        leaves = [x, *kw.values(), *model.parameters()]
        out = model(x, t, **kw)
        return out, torch.autograd.grad((out * weight).sum(), leaves)  # raises if a leaf was cut off

    out_eager, g_eager = grads(None)
    out_fused, g_fused = grads(be)
    assert out_fused.grad_fn is not None
    assert rel_err(out_fused.detach().cpu(), out_eager.detach().cpu()) < TOL
    assert rel_err(torch.cat([g.flatten() for g in g_fused]), torch.cat([g.flatten() for g in g_eager])) < TOL


class PlainUNetish(nn.Module):
    """A user's plain-torch model with the patterns optimize() documents."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 32, 3, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1),
                                   nn.GroupNorm(8, 32), nn.SiLU())
        self.norm = nn.GroupNorm(4, 32, affine=False)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Sequential(nn.GroupNorm(8, 32), nn.Conv2d(32, 3, 1))

    def forward(self, x):
        h = self.block(self.conv_in(x))
        h = torch.nn.functional.silu(self.norm(h))
        tok = h.flatten(2).transpose(1, 2)
        h = h + self.attn(tok, tok, tok, need_weights=False)[0].transpose(1, 2).reshape(h.shape)
        return self.out(h)


def test_optimize_keeps_a_plain_torch_models_output_and_reports(backend):
    be, device = backend
    torch.manual_seed(0)
    model = _randomise(PlainUNetish()).eval().to(device)
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = model(x)
        weights = {n: p.data_ptr() for n, p in model.named_parameters()}
        opt = fastdiff.optimize(model, backend=be)
        out = opt(x)
    assert opt is model
    assert rel_err(out.cpu(), ref.cpu()) < TOL
    rep = fastdiff.optimize_report(model)
    assert len(rep.replaced) == 4  # two GN+SiLU pairs, the affine-free GN, the GN in `out`
    assert sum("GroupNorm -> SiLU" in what for _, what in rep.replaced) == 2
    assert len(rep.modules()) == len(set(rep.modules()))  # each module reported once
    assert any(name == "attn" and "MultiheadAttention" in why for name, why in rep.not_replaced)
    assert len(model.block) == 3 and isinstance(model.block[0], fastdiff.nn.GroupNormSiLU)
    # the weights are the same Parameters, not copies
    assert {p.data_ptr() for p in model.parameters()} == set(weights.values())


def test_optimize_copy_leaves_the_original_alone():
    model = PlainUNetish().eval()
    opt = fastdiff.optimize(model, backend="reference", inplace=False)
    assert opt is not model and isinstance(model.block[0], nn.GroupNorm)
    assert isinstance(opt.block[0], fastdiff.nn.GroupNormSiLU)


def test_optimize_switches_a_fastdiff_unet_and_reports_it(capsys):
    model = UNet(UNetConfig.digits())
    fastdiff.optimize(model, backend="reference", verbose=True)
    rep = fastdiff.optimize_report(model)
    n_blocks = sum(isinstance(m, (fastdiff.nn.GroupNormSiLU, fastdiff.nn.AttentionBlock)) for m in model.modules())
    assert len(rep.fused) == n_blocks and not rep.replaced
    assert "fastdiff.nn module(s) fused" in capsys.readouterr().out


def test_optimize_bad_input():
    with pytest.raises(TypeError, match="model"):
        fastdiff.optimize("unet")
    with pytest.raises(TypeError, match="backend"):
        fastdiff.optimize(nn.Linear(2, 2), backend=None)
    with pytest.raises(ValueError, match="optimize"):
        fastdiff.optimize_report(nn.Linear(2, 2))

"""What one U-Net call launches: diffusers' eager forward vs `fastdiff.optimize()`, side by side.

The U-Net is UNet2DConditionModel with SD-1.5's block layout (4 levels, 2 layers per block,
cross-attention in the first three) at small channels, batch 2 (a CFG-doubled batch), 77 context
tokens, fp32 on the CPU. A TorchDispatchMode counts, per forward:

  ops     kernel-proxy ops: every aten/fastdiff op that computes or copies (views, metadata
          ops and bare allocations are not counted); fastdiff's custom ops are opened up and
          their insides counted, so a copy hidden in an op shows
  bytes   the tensors each counted op reads and writes (inputs + fresh outputs)
  kinds   the op names, so an op kind the optimized model adds shows

and the forward's CPU time (one thread, medians, the two models interleaved). Counts are
device-independent; the time is a CPU proxy, not a GPU timing. A script, not a pytest-benchmark
suite (so not named bench_*.py, which gpu_check runs as suites):

    PYTHONPATH=. python benchmarks/unet_op_counts.py
"""
from __future__ import annotations

import collections
import copy
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastdiff

NOT_KERNELS = {"detach", "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
               "new_empty_strided", "alias", "set_", "_reshape_alias"}
OPENED = {"fastdiff"}  # custom-op namespaces whose Python implementation is counted op by op
BATCH, CONTEXT = 2, 77
CONFIG = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns in OPENED:  # run the op's own implementation with this mode still counting
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd),
                                       *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # count what it decomposes into, as an eager call outside a custom op would
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NOT_KERNELS:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        seen = {t.data_ptr() for t in ins}
        fresh = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.data_ptr() not in seen]
        self.ops[f"{ns}.{name}"] += 1
        self.bytes += sum(t.nbytes for t in ins + fresh)
        return out


def models():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**CONFIG).eval()
    return unet, fastdiff.optimize(copy.deepcopy(unet), backend="auto")


def inputs(unet):
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    return (torch.randn(BATCH, unet.config.in_channels, size, size, generator=g), torch.tensor(500.0),
            torch.randn(BATCH, CONTEXT, unet.config.cross_attention_dim, generator=g))


def count(unet, args) -> OpCounter:
    with torch.no_grad():
        unet(*args)  # warm: first-call work (packing, caches) is not per-call work
        with OpCounter() as c:
            unet(*args)
    return c


def time_forwards(named, args, rounds=15, calls=3):
    """Median seconds per forward of each model, the models interleaved round by round."""
    times = {name: [] for name in named}
    with torch.no_grad():
        for _ in range(rounds):
            for name, unet in named.items():
                t0 = time.thread_time()
                for _ in range(calls):
                    unet(*args)
                times[name].append((time.thread_time() - t0) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    eager, fused = models()
    args = inputs(eager)
    with torch.no_grad():
        diff = (fused(*args).sample - eager(*args).sample).abs().max().item()
    ce, cf = count(eager, args), count(fused, args)
    ne, nf = sum(ce.ops.values()), sum(cf.ops.values())
    print(f"max |optimized - diffusers| = {diff:.2e}")
    print(f"ops per forward    diffusers {ne:6d}   optimized {nf:6d}   ratio {nf / ne:.3f}")
    print(f"MB per forward     diffusers {ce.bytes / 1e6:6.1f}   optimized {cf.bytes / 1e6:6.1f}   "
          f"ratio {cf.bytes / ce.bytes:.3f}")
    added = sorted(k for k in set(cf.ops) - set(ce.ops) if not k.startswith("fastdiff"))
    print(f"op kinds added (fastdiff's own kernels aside): {added or 'none'}")
    print("ops by kind (diffusers -> optimized):")
    for k in sorted(set(ce.ops) | set(cf.ops), key=lambda k: -max(ce.ops[k], cf.ops[k])):
        if ce.ops[k] != cf.ops[k]:
            print(f"  {k:<40} {ce.ops[k]:4d} -> {cf.ops[k]:4d}")
    t = time_forwards({"diffusers": eager, "optimized": fused}, args)
    print(f"CPU ms per forward (1 thread)  diffusers {t['diffusers'] * 1e3:.2f}   optimized "
          f"{t['optimized'] * 1e3:.2f}   ratio {t['optimized'] / t['diffusers']:.3f}")


if __name__ == "__main__":
    main()

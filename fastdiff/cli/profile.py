"""`python -m fastdiff profile`: run a sampling workload with NVTX ranges on.

Writes a torch-profiler Chrome trace (OUT/trace.json, open in chrome://tracing or Perfetto)
and a per-range summary (OUT/summary.md, also printed), then prints the `nsys` and `ncu`
command lines that profile the same workload in Nsight. With `--nsight` it only runs the
workload with NVTX on (what those command lines call).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from fastdiff.cli.common import UsageError, at_least_one, check_output_file, finite, make_out_dir, pick_device

MODELS = ("digits", "cifar", "sd15_like", "gmm")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(subparsers) -> argparse.ArgumentParser:
    from fastdiff import SOLVERS
    from fastdiff.ops._dispatch import AUTO, BACKENDS

    p = subparsers.add_parser("profile", help="profile a sampling workload (torch profiler trace + Nsight commands)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="cifar",
                   help="U-Net config with random weights (digits: the bundled model), or gmm: the analytic "
                        "model (default: %(default)s)")
    p.add_argument("--solver", choices=sorted(SOLVERS), default="dpmpp_2m", metavar="SOLVER",
                   help="one of %(choices)s (default: %(default)s)")
    p.add_argument("--steps", type=at_least_one, default=8, help="sampling steps (default: %(default)s)")
    p.add_argument("--batch", type=at_least_one, default=1, help="images per sampling call (default: %(default)s)")
    p.add_argument("--guidance-scale", type=finite, default=None,
                   help="CFG scale (default: 7.5 for sd15_like, else no guidance)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="record the loop in one CUDA graph; needs a CUDA device and a fused backend "
                        "(default: on with a GPU and a fused backend)")
    p.add_argument("--backend", choices=(AUTO,) + BACKENDS, default=AUTO,
                   help="sampler backend; a forced one must be able to run on the device (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s: cuda when "
                                                    "torch sees a GPU)")
    p.add_argument("--iters", type=at_least_one, default=3,
                   help="profiled sampling calls after one warm-up call (default: %(default)s)")
    p.add_argument("--out", default="fastdiff-profile", help="output directory (default: %(default)s)")
    p.add_argument("--nsight", action="store_true",
                   help="no torch profiler: only run the workload with NVTX on, for nsys/ncu (default: off)")
    p.set_defaults(func=run)
    return p


def _check(args, device) -> None:
    """The option combinations that cannot run on `device`, as one-line usage errors."""
    from fastdiff.ops.solver_step import DISPATCH

    why = DISPATCH.plan(device.type)["skipped"].get(args.backend)
    if why:
        raise UsageError(f"--backend {args.backend}: cannot run on {device.type} tensors here: {why}")
    if args.graph and device.type != "cuda":
        raise UsageError(f"--graph: needs a CUDA device, the workload runs on {device}")
    if args.graph and args.backend == "reference":
        raise UsageError("--graph: needs a fused backend, not --backend reference")


def _workload(args, device, torch, fastdiff):
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")])
    g = torch.Generator(device).manual_seed(0)
    if args.model == "gmm":
        from fastdiff.testing import GaussianMixture

        gm = GaussianMixture.random(shape=(4, 32, 32), seed=0)
        return gm.model(fastdiff.get_schedule("linear"), "epsilon", dtype=dtype), \
            torch.randn(args.batch, 4, 32, 32, generator=g, device=device), {}, dtype
    from fastdiff.nn import UNet, UNetConfig

    if args.model == "digits":
        from fastdiff.demo import load_digits_model

        model = load_digits_model()
    else:
        torch.manual_seed(0)
        model = UNet(getattr(UNetConfig, args.model)())
    model = model.to(device, dtype).eval()
    if args.backend != "reference":
        model.set_backend("auto")  # the fused U-Net blocks, like the sampler's fused steps
    cfg = model.config
    noise = torch.randn((args.batch,) + cfg.sample_shape, generator=g, device=device)
    w = args.guidance_scale if args.guidance_scale is not None else (7.5 if cfg.context_dim else 1.0)
    kw = {"guidance_scale": w}
    if cfg.context_dim:
        ctx = torch.randn(args.batch, cfg.context_length, cfg.context_dim, generator=g, device=device, dtype=dtype)
        kw.update(cond={"context": ctx}, uncond={"context": torch.zeros_like(ctx)})
    elif cfg.num_classes:
        labels = torch.arange(args.batch, device=device) % cfg.num_classes
        kw.update(cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, cfg.num_classes)})
    if w == 1.0:
        kw.pop("uncond", None)
    return model, noise, kw, dtype


def _summary(prof, torch) -> str:
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("fastdiff"):
            dev = getattr(e, "device_time_total", 0.0) or 0.0
            rows.append((e.key, e.count, e.cpu_time_total / 1e3, dev / 1e3))
    rows.sort(key=lambda r: -max(r[2], r[3]))
    lines = ["| range / op | calls | CPU total ms | device total ms |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {n} | {c:.3f} | {d:.3f} |" for k, n, c, d in rows]
    return "\n".join(lines)


def run(args) -> int:
    import torch

    import fastdiff
    from fastdiff import profiling

    device = pick_device(args.device)
    _check(args, device)
    if not args.nsight:
        make_out_dir(args.out)
        for name in ("trace.json", "summary.md"):
            check_output_file("--out", os.path.join(args.out, name))
    model, noise, kw, dtype = _workload(args, device, torch, fastdiff)
    graph = args.graph if args.graph is not None else (noise.is_cuda and args.backend != "reference")
    sampler = fastdiff.Sampler(solver=args.solver, steps=args.steps, backend=args.backend)

    def once():
        with torch.no_grad():
            out = sampler.sample(model, noise, model_dtype=dtype, cuda_graph=graph, **kw)
        if noise.is_cuda:
            torch.cuda.synchronize()
        return out

    def say(msg):  # the profiled calls of a big model on a CPU take minutes: say where it is
        print(f"profile: {msg}", file=sys.stderr, flush=True)

    say(f"warm-up call ({args.model}, batch {args.batch}, {args.solver} x {args.steps} steps, {device}) ...")
    once()  # warm-up: capture / autotune / lazy init outside what is profiled
    if args.nsight:
        profiling.enable(True)
        for i in range(args.iters):
            say(f"call {i + 1}/{args.iters} with NVTX ranges ...")
            once()
        return 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if noise.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiling.enable(True, record_functions=True)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for i in range(args.iters):
                say(f"profiled call {i + 1}/{args.iters} ...")
                once()
            elapsed = time.perf_counter() - t0
    finally:
        profiling.enable(False)
    trace = os.path.join(args.out, "trace.json")
    say(f"writing {trace} and the summary ...")
    prof.export_chrome_trace(trace)
    ms = 1e3 * elapsed / args.iters
    head = (f"workload: {args.model} batch {args.batch}, {args.solver} x {args.steps} steps "
            f"({sampler.model_calls} model calls), {dtype}, "
            f"{noise.device}, graph={graph}, guidance={kw.get('guidance_scale', 1.0)}; "
            f"{ms:.2f} ms per sampling call (profiled, so slower than a benchmark)")
    table = _summary(prof, torch)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(head + "\n\n" + table + "\n")
    base = [sys.executable, "-m", "fastdiff", "profile", "--nsight", "--model", args.model, "--solver", args.solver,
            "--steps", str(args.steps), "--batch", str(args.batch), "--iters", "1"]
    nsys = ["nsys", "profile", "-t", "cuda,nvtx,osrt", "--cuda-graph-trace=node", "-o", "fastdiff_nsys"] + base
    ncu = ["ncu", "--nvtx", "--nvtx-include", "fastdiff/solver_step/", "--set", "full", "-o", "fastdiff_ncu"] + base
    ncu += ["--no-graph"]  # NVTX ranges exist per step only in the eager loop
    print(head)
    print(table)
    print(f"\ntrace: {trace}\nNsight Systems: {shlex.join(nsys)}\nNsight Compute: {shlex.join(ncu)}")
    return 0

"""Interleaved A/B timing of `fastdiff.generate` on the bundled digits model (CPU or GPU).

pytest-benchmark times providers one after another, so on a shared machine a change in load
between them reads as a difference; this script alternates them round by round instead.

    python benchmarks/generate_ab.py overhead [--images 400 --batch 100 --rounds 7]
        plain `Sampler.sample` loop vs `generate` (per-image noise, shards, merge, grid), and
        generate's own time measured inside each call (immune to load changes between calls)
    python benchmarks/generate_ab.py processes [--images 1000 --batch 100 --rounds 3]
        `python -m fastdiff generate` on 1 process (1 and 2 threads) vs `torchrun --nproc_per_node=2`
        (gloo on CPUs, 1 thread each); images/s of the sampling phase and of the whole command

Prints medians (and every round) as a markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overhead(args) -> None:
    import torch

    from fastdiff.demo.workload import digits
    from fastdiff.generation import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    graph = "auto" if device == "cuda" else False
    w = digits(device=device)
    batches = [torch.arange(s, min(s + args.batch, args.images)) for s in range(0, args.images, args.batch)]
    root = tempfile.mkdtemp(prefix="fastdiff-generate-ab-")

    def sample_loop():
        g = torch.Generator(device).manual_seed(0)
        with torch.inference_mode():
            for idx in batches:
                cond = {k: v.to(device) for k, v in w.cond(idx).items()}
                plain_sample(w.model, shape=(len(idx),) + w.shape, generator=g, device=device, cond=cond,
                                 cuda_graph=graph).cpu()

    inside = []  # seconds generate spends inside Sampler.sample, per call: the rest is its overhead
    plain_sample = w.sampler.sample

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        out = plain_sample(*a, **k)
        inside[-1] += time.perf_counter() - t0
        return out

    w.sampler.sample = timed_sample

    def gen(i):
        inside.append(0.0)
        generate(w.model, w.sampler, args.images, 0, args.batch, f"{root}/{i}", shape=w.shape, cond=w.cond,
                 device=device, cuda_graph=graph, progress=False)

    times = {"sample": [], "generate": []}
    try:
        sample_loop(), gen("warm")
        for r in range(args.rounds):
            for name, fn in (("sample", sample_loop), ("generate", lambda: gen(r)))[:: 1 if r % 2 else -1]:
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.images} images, batch {args.batch}, {device}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds\n")
    print("| provider | median s | images/s | rounds (s) |\n|---|---:|---:|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {args.images / med[k]:.1f} | {', '.join(f'{t:.2f}' for t in v)} |")
    ratios = [g / s for g, s in zip(times["generate"], times["sample"])]
    print(f"\ngenerate / sample: median of per-round ratios {statistics.median(ratios):.3f} "
          f"(ratio of medians {med['generate'] / med['sample']:.3f})")
    own = [(t - s) / s for t, s in zip(times["generate"], inside[1:])]  # inside[0]: the warm-up call
    print(f"generate's own time (everything outside Sampler.sample: per-image seeds, shard writes with fsync, "
          f"merge, grid, fingerprint) / its sampling time, same call: median {100 * statistics.median(own):.1f} % "
          f"(rounds: {', '.join(f'{100 * o:.1f}' for o in own)} %)")


def processes(args) -> None:
    base = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
                PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cli = ["-m", "fastdiff", "generate", "--num-images", str(args.images), "--batch-size", str(args.batch),
           "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    configs = {  # label: (launcher, OMP_NUM_THREADS)
        "1 process x 1 thread": ([sys.executable], "1"),
        "1 process x 2 threads": ([sys.executable], "2"),
        "2 processes x 1 thread (torchrun, gloo)": (torchrun, "1"),
    }
    rows = {k: [] for k in configs}
    root = tempfile.mkdtemp(prefix="fastdiff-generate-ab-")
    try:
        for r in range(args.rounds):
            for i, (label, (launcher, threads)) in enumerate(list(configs.items())[:: 1 if r % 2 else -1]):
                t0 = time.perf_counter()
                p = subprocess.run(launcher + cli + ["--out", f"{root}/{r}-{i}"], capture_output=True, text=True,
                                   env=dict(base, OMP_NUM_THREADS=threads), check=True)
                wall = time.perf_counter() - t0
                rate = float(re.search(r"\(([\d.]+) images/s\)", p.stdout).group(1))
                rows[label].append((rate, args.images / wall))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.images} images, batch {args.batch}, digits dpmpp_2m 8 steps, CPU, {args.rounds} interleaved "
          "rounds\n")
    print("| run | sampling images/s (median) | whole command images/s (median) | rounds (sampling) |")
    print("|---|---:|---:|---|")
    for label, v in rows.items():
        print(f"| {label} | {statistics.median(a for a, _ in v):.1f} | {statistics.median(b for _, b in v):.1f} | "
              f"{', '.join(f'{a:.1f}' for a, _ in v)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["overhead", "processes"])
    p.add_argument("--images", type=int)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int)
    args = p.parse_args()
    if args.what == "overhead":
        args.images, args.rounds = args.images or 400, args.rounds or 7
        overhead(args)
    else:
        args.images, args.rounds = args.images or 1000, args.rounds or 3
        processes(args)


if __name__ == "__main__":
    main()

"""`python -m fastdiff generate`: sample at scale (evaluate.py measures FD/KID, compare.py compares samplers).

    python -m fastdiff generate --num-images 1000 --out samples          # the bundled digits model
    torchrun --standalone --nproc_per_node=2 -m fastdiff generate ...    # same file, K processes
    python -m fastdiff evaluate samples/samples.npz --reference digits
    python -m fastdiff compare --configs ddim:8 dpmpp_2m:8 --num-images 500 --out cmp

`--model module:function` samples your own model: `function(device=..., [solver=, steps=,
guidance_scale=] only those given on the command line)` returns a `fastdiff.Workload`.
"""
from __future__ import annotations

import importlib
import os

from fastdiff.cli.common import UsageError, finite, pick_device

DEFAULT_MODEL = "fastdiff.demo.workload:digits"


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="sample N images reproducibly into shards and one .npz (torchrun-aware)",
                              description="Sample N images into OUT/samples.npz and OUT/grid.png, in restartable "
                                          "shards; under torchrun the ranks split the images.")
    sampling_args(g)
    g.add_argument("--out", default="fastdiff-samples", help="output directory (default: ./fastdiff-samples)")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=_generate)


def sampling_args(p, solver: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="MODULE:FUNCTION",
                   help=f"what to sample: a function returning a fastdiff.Workload (default: {DEFAULT_MODEL})")
    p.add_argument("--num-images", type=int, default=1000, help="images to generate (default: 1000)")
    p.add_argument("--batch-size", type=int, default=100, help="images per model batch and per shard (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="image i's noise is seeded by (seed, i) (default: 0)")
    if solver:
        p.add_argument("--solver", help="solver (default: the model's; digits: dpmpp_2m)")
        p.add_argument("--steps", type=int, help="steps (default: the model's; digits: 8)")
    p.add_argument("--guidance-scale", type=finite, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--device", default="auto", help="cuda, cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def load_workload(spec: str, device, **options):
    """Import `module:function` and call it; every failure is a UsageError naming --model."""
    from fastdiff.generation import Workload

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--model: expected MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UsageError(f"--model {spec}: cannot import {module!r} ({e})") from e
    except AttributeError as e:
        raise UsageError(f"--model {spec}: {module!r} has no {name!r}") from e
    if not callable(fn):
        raise UsageError(f"--model {spec}: {name!r} is not callable")
    try:
        w = fn(device=device, **{k: v for k, v in options.items() if v is not None})
    except (TypeError, ValueError) as e:  # unknown option, bad solver/steps for this model
        raise UsageError(f"--model {spec}: {e}") from e
    if not isinstance(w, Workload):
        raise UsageError(f"--model {spec}: returned {type(w).__name__}, expected a fastdiff.Workload")
    return w


def check_sampling_args(args, run_dirs) -> None:
    """Every sampling option and every output directory in `run_dirs`, before the model is loaded."""
    from fastdiff.generation import BadArgument, check_count, check_run_dir

    try:
        check_count("--num-images", args.num_images)
        check_count("--batch-size", args.batch_size)
        check_count("--seed", args.seed, minimum=0)
        if getattr(args, "steps", None) is not None:
            check_count("--steps", args.steps)
        for d in run_dirs:
            check_run_dir(d)
    except BadArgument as e:
        raise UsageError(str(e).replace("out_dir:", "--out:")) from e


def setup_distributed(device_arg: str):
    """(device, world): under torchrun, a process group (NCCL on GPUs, gloo on CPUs) and this
    rank's device; else no group."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_arg)
    try:
        if world > 1 and device.type == "cuda":  # one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device_arg}: {e} (under torchrun: one GPU per process, or --device cpu)") from e
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world


def run_generate(args, w, device, out_dir, progress):
    from fastdiff.generation import BadArgument, generate

    try:
        return generate(w.model, w.sampler, args.num_images, args.seed, args.batch_size, out_dir, shape=w.shape,
                        cond=w.cond, uncond=w.uncond, guidance_scale=w.guidance_scale, decode=w.decode, device=device,
                        cuda_graph="auto" if device.type == "cuda" else False, progress=progress, name=args.model)
    except BadArgument as e:
        raise UsageError(str(e).replace("out_dir:", "--out:")) from e


def _generate(args) -> int:
    check_sampling_args(args, [args.out])
    device, world = setup_distributed(args.device)
    try:
        w = load_workload(args.model, device, solver=args.solver, steps=args.steps, guidance_scale=args.guidance_scale)
        r = run_generate(args, w, device, args.out, progress=not args.no_progress)
    finally:
        teardown(world)
    if rank() == 0:
        rate = f"{r.images_per_second:.1f} images/s" if r.generated else "all shards were already done"
        grid = f" and {r.grid_path}" if r.grid_path else ""
        print(f"wrote {r.path} ({args.num_images} images){grid}; sampled {r.generated} images on "
              f"{world} process(es) in {r.seconds:.1f} s ({rate})")
    return 0


def teardown(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


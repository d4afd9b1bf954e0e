"""`python -m fastdiff generate | evaluate | compare`: sample at scale, measure FD/KID, compare samplers.

    python -m fastdiff generate --num-images 1000 --out samples          # the bundled digits model
    torchrun --standalone --nproc_per_node=2 -m fastdiff generate ...    # same file, K processes
    python -m fastdiff evaluate samples/samples.npz --reference digits
    python -m fastdiff compare --configs ddim:8 dpmpp_2m:8 --num-images 500 --out cmp

`--model module:function` samples your own model: `function(device=..., [solver=, steps=,
guidance_scale=] only those given on the command line)` returns a `fastdiff.Workload`.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

from fastdiff.cli.common import UsageError, check_output_file, finite, pick_device

DEFAULT_MODEL = "fastdiff.demo.workload:digits"


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="sample N images reproducibly into shards and one .npz (torchrun-aware)",
                              description="Sample N images into OUT/samples.npz and OUT/grid.png, in restartable "
                                          "shards; under torchrun the ranks split the images.")
    _sampling_args(g)
    g.add_argument("--out", default="fastdiff-samples", help="output directory (default: ./fastdiff-samples)")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=_generate)

    e = subparsers.add_parser("evaluate", help="FD and KID (bootstrap 95%% intervals) of a samples .npz",
                              description="FD and KID of SAMPLES against a reference, in the bundled digits "
                                          "classifier's feature space, with bootstrap 95%% intervals.")
    e.add_argument("samples", metavar="SAMPLES", help="a samples.npz written by `generate`")
    _evaluation_args(e)
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(func=_evaluate)

    c = subparsers.add_parser("compare", help="generate + evaluate + time several solver:steps configurations",
                              description="For each solver:steps, generate (OUT/<solver>-<steps>/), evaluate and "
                                          "time; writes OUT/table.md and OUT/results.json.")
    c.add_argument("--configs", nargs="+", default=["ddim:8", "dpmpp_2m:8", "dpmpp_3m:8", "dpmpp_2m_sde:8"],
                   metavar="SOLVER:STEPS", help="configurations (default: ddim:8 dpmpp_2m:8 dpmpp_3m:8 dpmpp_2m_sde:8)")
    _sampling_args(c, solver=False)
    _evaluation_args(c)
    c.add_argument("--out", default="fastdiff-compare", help="output directory (default: ./fastdiff-compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=_compare)


def _sampling_args(p, solver: bool = True) -> None:
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


def _evaluation_args(p) -> None:
    p.add_argument("--reference", default="digits", metavar="REF",
                   help="'digits' (held-out split, default), 'digits-train', or a .npz with uint8 'images'")
    p.add_argument("--features", default="classifier", help="feature space: classifier (default) or inception")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates for the 95%% intervals (0: none)")


def _rank() -> int:
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


def _check_sampling_args(args, run_dirs) -> None:
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


def _setup_distributed(device_arg: str):
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


def _run_generate(args, w, device, out_dir, progress):
    from fastdiff.generation import BadArgument, generate

    try:
        return generate(w.model, w.sampler, args.num_images, args.seed, args.batch_size, out_dir, shape=w.shape,
                        cond=w.cond, uncond=w.uncond, guidance_scale=w.guidance_scale, decode=w.decode, device=device,
                        cuda_graph="auto" if device.type == "cuda" else False, progress=progress, name=args.model)
    except BadArgument as e:
        raise UsageError(str(e).replace("out_dir:", "--out:")) from e


def _generate(args) -> int:
    _check_sampling_args(args, [args.out])
    device, world = _setup_distributed(args.device)
    try:
        w = load_workload(args.model, device, solver=args.solver, steps=args.steps, guidance_scale=args.guidance_scale)
        r = _run_generate(args, w, device, args.out, progress=not args.no_progress)
    finally:
        _teardown(world)
    if _rank() == 0:
        rate = f"{r.images_per_second:.1f} images/s" if r.generated else "all shards were already done"
        grid = f" and {r.grid_path}" if r.grid_path else ""
        print(f"wrote {r.path} ({args.num_images} images){grid}; sampled {r.generated} images on "
              f"{world} process(es) in {r.seconds:.1f} s ({rate})")
    return 0


def _teardown(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _evaluate(args) -> int:
    from fastdiff.evaluation import EvaluationError, check_options, check_pair, evaluate, format_result, \
        load_reference, load_samples

    if args.json:
        check_output_file("--json", args.json)
    try:
        check_options(args.features, args.bootstrap)
        samples = load_samples(args.samples)
        reference = load_reference(args.reference)
        check_pair(samples, reference)
        print(f"evaluate: {args.samples} ({samples.images.shape[0]} images), {args.bootstrap} bootstrap replicates "
              "...", file=sys.stderr, flush=True)
        result = evaluate(samples, reference, features=args.features, bootstrap=args.bootstrap, seed=0)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    print(format_result(os.path.basename(args.samples), result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _parse_configs(configs) -> list:
    from fastdiff import SOLVERS

    out = []
    for c in configs:
        solver, sep, steps = c.partition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise UsageError(f"--configs: expected SOLVER:STEPS with STEPS >= 1, got {c!r}")
        if solver not in SOLVERS:
            raise UsageError(f"--configs {c}: unknown solver {solver!r}, expected one of {', '.join(sorted(SOLVERS))}")
        out.append((solver, int(steps)))
    return out


def _compare(args) -> int:
    from fastdiff.evaluation import EvaluationError, check_options, evaluate, load_reference, load_samples

    configs = _parse_configs(args.configs)
    if args.num_images < 2:  # FD and KID compare feature covariances
        raise UsageError(f"--num-images {args.num_images}: compare evaluates FD and KID, which need >= 2 images")
    run_dirs = [os.path.join(args.out, f"{solver}-{steps}") for solver, steps in configs]
    _check_sampling_args(args, [args.out] + run_dirs)
    for name in ("table.md", "results.json"):
        check_output_file("--out", os.path.join(args.out, name))
    try:
        check_options(args.features, args.bootstrap)
        reference = load_reference(args.reference)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    device, world = _setup_distributed(args.device)
    rows = []
    try:
        # every configuration's workload before the first image: one the model refuses fails now
        workloads = [load_workload(args.model, device, solver=solver, steps=steps, guidance_scale=args.guidance_scale)
                     for solver, steps in configs]
        for k, ((solver, steps), w, run_dir) in enumerate(zip(configs, workloads, run_dirs)):
            if _rank() == 0 and not args.no_progress:
                print(f"compare: {solver}:{steps} ({k + 1}/{len(configs)}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            r = _run_generate(args, w, device, run_dir, progress=not args.no_progress)
            if _rank() != 0:
                continue
            try:
                m = evaluate(load_samples(r.path), reference, features=args.features, bootstrap=args.bootstrap)
            except EvaluationError as e:
                raise UsageError(str(e)) from e
            rows.append(dict(m, solver=solver, steps=steps, model_calls=w.sampler.model_calls,
                             images_per_second=r.images_per_second if r.generated else None,
                             seconds=time.perf_counter() - t0, processes=world))
            print(f"{solver} {steps}: FD {m['fd']:.3f}, {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        _teardown(world)
    if _rank() == 0:
        table = format_table(rows, args)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=2)
        print(table)
    return 0


def format_table(rows, args) -> str:
    head = "| solver | steps | model calls | images/s | FD [95% CI] | KID x1e3 [95% CI] | acc % |"
    lines = [f"{args.num_images} images per row, seed {args.seed}, reference {args.reference}, "
             f"{rows[0]['processes'] if rows else 1} process(es); images/s: sampling only (shards included)", "",
             head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ci = lambda k, s=1.0: f" [{s * r[k][0]:.2f}, {s * r[k][1]:.2f}]" if k in r else ""  # noqa: E731
        ips = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "- (resumed)"
        acc = f"{100 * r['acc']:.1f}" if "acc" in r else "-"
        lines.append(f"| {r['solver']} | {r['steps']} | {r['model_calls']} | {ips} | {r['fd']:.2f}{ci('fd_ci')} | "
                     f"{1e3 * r['kid']:.2f}{ci('kid_ci', 1e3)} | {acc} |")
    return "\n".join(lines)

"""`python -m fastdiff compare`: generate, evaluate and time several solver:steps configurations.

Under torchrun every rank samples (`generate`: the same files as one process); rank 0 alone
evaluates, with no collective inside, then tells every rank whether that failed, so all ranks
enter the same collectives in the same order and the table is the one-process table."""
from __future__ import annotations

import json
import os
import sys

from fastdiff.cli.common import UsageError, check_output_file
from fastdiff.cli.evaluate import evaluation_args
from fastdiff.cli.generate import check_sampling_args, load_workload, rank, run_generate, sampling_args, \
    setup_distributed, teardown


def register(subparsers) -> None:
    c = subparsers.add_parser("compare", help="generate + evaluate + time several solver:steps configurations",
                              description="For each solver:steps, generate (OUT/<solver>-<steps>/), evaluate and "
                                          "time; writes OUT/table.md and OUT/results.json.")
    c.add_argument("--configs", nargs="+", default=["ddim:8", "dpmpp_2m:8", "dpmpp_3m:8", "dpmpp_2m_sde:8"],
                   metavar="SOLVER:STEPS", help="configurations (default: ddim:8 dpmpp_2m:8 dpmpp_3m:8 dpmpp_2m_sde:8)")
    sampling_args(c, solver=False)
    evaluation_args(c)
    c.add_argument("--perceptual-reference", default="dpmpp_2m:100", metavar="SOLVER:STEPS",
                   help="the many-step run each image's perceptual distance is measured to (same noise and "
                        "condition; OUT/reference-<solver>-<steps>/), or 'none' (default: dpmpp_2m:100)")
    c.add_argument("--ppl-pairs", type=int, default=200,
                   help="noise pairs for PPL (0: no PPL; default: 200, enough to trim the 1%% tails)")
    c.add_argument("--out", default="fastdiff-compare", help="output directory (default: ./fastdiff-compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=_compare)


def _parse_configs(configs, option="--configs") -> list:
    from fastdiff import SOLVERS

    out = []
    for c in configs:
        solver, sep, steps = c.partition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise UsageError(f"{option}: expected SOLVER:STEPS with STEPS >= 1, got {c!r}")
        if solver not in SOLVERS:
            raise UsageError(f"{option} {c}: unknown solver {solver!r}, expected one of {', '.join(sorted(SOLVERS))}")
        out.append((solver, int(steps)))
    return out


def _check_args(args):
    """Every option, configuration and output path before the first model call: (configs,
    perceptual reference config or None, run directories, reference directory or None, reference images)."""
    from fastdiff.evaluation import EvaluationError, check_options, load_reference

    configs = _parse_configs(args.configs)
    perceptual = None if args.perceptual_reference == "none" else \
        _parse_configs([args.perceptual_reference], "--perceptual-reference")[0]
    if args.num_images < 2:  # FD and KID compare feature covariances
        raise UsageError(f"--num-images {args.num_images}: compare evaluates FD and KID, which need >= 2 images")
    if args.ppl_pairs < 0:
        raise UsageError(f"--ppl-pairs: expected >= 0 pairs (0: no PPL), got {args.ppl_pairs}")
    run_dirs = [os.path.join(args.out, f"{solver}-{steps}") for solver, steps in configs]
    ref_dir = os.path.join(args.out, "reference-{}-{}".format(*perceptual)) if perceptual else None
    check_sampling_args(args, [args.out] + run_dirs + ([ref_dir] if ref_dir else []))
    for name in ("table.md", "results.json"):
        check_output_file("--out", os.path.join(args.out, name))
    try:
        check_options(args.features, args.bootstrap, args.is_splits)
        reference = load_reference(args.reference)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    if args.features == "lpips" and not perceptual:
        raise UsageError("--features lpips: LPIPS compares each image with the --perceptual-reference run's, "
                         "which is 'none'")
    return configs, perceptual, run_dirs, ref_dir, reference


def _compare(args) -> int:
    from fastdiff.generation import on_rank0

    configs, perceptual, run_dirs, ref_dir, reference = _check_args(args)
    progress = not args.no_progress
    device, world = setup_distributed(args.device)
    rows = []
    try:
        # every configuration's workload before the first image: one the model refuses fails now
        load = lambda solver, steps: load_workload(args.model, device, solver=solver, steps=steps,  # noqa: E731
                                                   guidance_scale=args.guidance_scale)
        workloads = [load(solver, steps) for solver, steps in configs]
        shape = tuple(workloads[0].shape)
        if workloads[0].decode is None and shape != tuple(reference.shape[1:]):  # a decoder's output is seen late
            raise UsageError(f"--model {args.model}: samples {'x'.join(map(str, shape))} images, --reference "
                             f"{args.reference} holds {'x'.join(map(str, reference.shape[1:]))} images")
        paired = None
        if perceptual:
            if rank() == 0 and progress:
                print("compare: the perceptual distance's reference {}:{} ...".format(*perceptual), file=sys.stderr,
                      flush=True)
            paired = run_generate(args, load(*perceptual), device, ref_dir, progress=progress).path
        for k, ((solver, steps), w, run_dir) in enumerate(zip(configs, workloads, run_dirs)):
            if rank() == 0 and progress:
                print(f"compare: {solver}:{steps} ({k + 1}/{len(configs)}) ...", file=sys.stderr, flush=True)
            r = run_generate(args, w, device, run_dir, progress=progress)
            row = on_rank0(lambda: _evaluate_row(args, reference, r, w, paired, device), UsageError)
            if rank() == 0:
                rows.append(dict(row, solver=solver, steps=steps, model_calls=w.sampler.model_calls, processes=world,
                                 ms_per_image=1000.0 / r.images_per_second if r.generated else None))
                if progress:
                    print(f"compare: {solver}:{steps}: FD {row['fd']:.3f}", file=sys.stderr, flush=True)
    finally:
        teardown(world)
    if rank() == 0:
        table = format_table(rows, args)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=2)
        print(table)
    return 0


def _evaluate_row(args, reference, r, w, paired, device) -> dict:
    """Rank 0's metrics of one configuration: its samples against the reference images and the
    paired run, and the PPL of its noise-to-image map."""
    from fastdiff.evaluation import EvaluationError, evaluate, load_samples, sampler_ppl

    try:
        m = evaluate(load_samples(r.path), reference, features=args.features, bootstrap=args.bootstrap,
                     seed=args.seed, device=device, paired=load_samples(paired, "--perceptual-reference")
                     if paired else None, is_splits=args.is_splits)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    if args.ppl_pairs:
        m.update(sampler_ppl(w, args.ppl_pairs, seed=args.seed, device=device, bootstrap=args.bootstrap))
    return m


def format_table(rows, args) -> str:
    from fastdiff.evaluation import COLUMNS, format_value
    from fastdiff.external_metrics import COLUMNS as EXTERNAL

    columns = COLUMNS + tuple(c for c in EXTERNAL if any(c[0] in r for r in rows))
    head = ["method", "model calls", "ms per image"] + [label for _, label, _, _ in columns]
    perceptual = "no perceptual distance" if args.perceptual_reference == "none" else \
        f"perceptual distance to {args.perceptual_reference} from the same noise"
    lines = [f"{args.num_images} images per row, seed {args.seed}, reference {args.reference}; 95 % bootstrap "
             f"intervals ({args.bootstrap} replicates); {perceptual}; PPL over {args.ppl_pairs} noise pairs; "
             "ms per image: sampling only", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        ms = f"{r['ms_per_image']:.2f}" if r["ms_per_image"] else "- (resumed)"
        cells = [f"{r['solver']}:{r['steps']}", str(r["model_calls"]), ms] + \
            [format_value(r, key, scale, fmt) for key, _, scale, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

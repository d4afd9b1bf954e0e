"""`python -m fastdiff compare`: generate, evaluate and time several solver:steps configurations."""
from __future__ import annotations

import json
import os
import sys
import time

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
    c.add_argument("--out", default="fastdiff-compare", help="output directory (default: ./fastdiff-compare)")
    c.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=_compare)


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
    check_sampling_args(args, [args.out] + run_dirs)
    for name in ("table.md", "results.json"):
        check_output_file("--out", os.path.join(args.out, name))
    try:
        check_options(args.features, args.bootstrap)
        reference = load_reference(args.reference)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    device, world = setup_distributed(args.device)
    rows = []
    try:
        # every configuration's workload before the first image: one the model refuses fails now
        workloads = [load_workload(args.model, device, solver=solver, steps=steps, guidance_scale=args.guidance_scale)
                     for solver, steps in configs]
        shape = tuple(workloads[0].shape)
        if workloads[0].decode is None and shape != tuple(reference.shape[1:]):  # a decoder's output is seen late
            raise UsageError(f"--model {args.model}: samples {'x'.join(map(str, shape))} images, --reference "
                             f"{args.reference} holds {'x'.join(map(str, reference.shape[1:]))} images")
        for k, ((solver, steps), w, run_dir) in enumerate(zip(configs, workloads, run_dirs)):
            if rank() == 0 and not args.no_progress:
                print(f"compare: {solver}:{steps} ({k + 1}/{len(configs)}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            r = run_generate(args, w, device, run_dir, progress=not args.no_progress)
            if rank() != 0:
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
        teardown(world)
    if rank() == 0:
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

"""`python -m fastdiff demo`: sample the bundled digits model and compare samplers.

Writes OUT/samples.png (a grid: column k shows digit k), OUT/table.md and OUT/results.json,
and prints the sampler comparison table (see `fastdiff.demo.evaluate` for the metrics).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from fastdiff.cli.common import UsageError, at_least_one, check_output_file, finite, make_out_dir, pick_device

QUICK_IMAGES = 50


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="sample the bundled digits model and print a sampler comparison table",
        description=__doc__.split("\n\n")[0] + " Needs the demo extra: pip install 'fastdiff[demo]'.")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run (< 1 minute on a 2-core CPU): {QUICK_IMAGES} images, 5 rows, and DPM-Solver++ 2M "
                        "at 100 steps as the RMS reference (closer to DDIM 1000 than DDIM 250 is)")
    p.add_argument("--solver", default="dpmpp_2m", help="solver of the sample grid (default: dpmpp_2m)")
    p.add_argument("--steps", type=at_least_one, default=8, help="steps of the sample grid (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of DDPM's noise)")
    p.add_argument("--out", default="fastdiff-demo", help="output directory (default: ./fastdiff-demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto: cuda if available)")
    p.add_argument("--num-images", type=at_least_one, default=None,
                   help=f"images per row (default: 250 on a GPU, 100 on a CPU, where the two 1000-step rows "
                        f"take minutes; {QUICK_IMAGES} with --quick)")
    p.add_argument("--guidance-scale", type=finite, default=1.0,
                   help="classifier-free guidance scale (default 1: conditional only, one model call per step)")
    p.add_argument("--no-table", action="store_true", help="only write the sample grid")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        import torch
        import fastdiff
        from fastdiff.demo import evaluate as E
        from fastdiff.demo import load_classifier, load_digits_model, model_facts
        from fastdiff.demo.data import load_split
        from fastdiff.demo.png import save_png_grid
    except ImportError as e:  # pragma: no cover - environment dependent
        raise UsageError(f"{e}. Install the demo extra: pip install 'fastdiff[demo]'") from None
    if not args.no_table:
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise UsageError("the comparison table needs torchmetrics: pip install 'fastdiff[demo]' "
                             "(or pass --no-table)") from None
    if args.solver not in fastdiff.SOLVERS:
        raise UsageError(f"--solver: expected one of {sorted(fastdiff.SOLVERS)}, got {args.solver!r}")
    device = pick_device(args.device)
    n = args.num_images if args.num_images is not None else (
        QUICK_IMAGES if args.quick else (250 if device.type == "cuda" else 100))
    if n < 2 and not args.no_table:  # FD and KID compare feature covariances
        raise UsageError(f"--num-images {n}: the comparison table needs >= 2 images (or pass --no-table)")
    make_out_dir(args.out)
    for name in ("samples.png",) + (() if args.no_table else ("table.md", "results.json")):
        check_output_file("--out", os.path.join(args.out, name))
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    t_start = time.time()

    model = load_digits_model(device=device).set_backend("auto")  # fused GroupNorm+SiLU / attention blocks
    facts = model_facts()
    noise = E.make_noise(n, args.seed, tuple(model.config.sample_shape), device)
    labels = E.balanced_labels(n, model.config.num_classes, device)
    params = model.count_parameters()
    print(f"fastdiff demo: digits U-Net ({params / 1e6:.2f}M parameters, trained {facts['steps']} steps), "
          f"{n} images, guidance {args.guidance_scale:g}, device {device}, backend auto (fused blocks and steps), seed {args.seed}")

    try:
        x, sec = E.generate(model, noise, labels, args.solver, args.steps, guidance_scale=args.guidance_scale,
                            seed=args.seed)
    except ValueError as e:  # a solver/steps combination this (VP, epsilon) model cannot use
        raise UsageError(f"--solver {args.solver} --steps {args.steps}: {e}") from None
    grid_path = os.path.join(args.out, "samples.png")
    save_png_grid(grid_path, x[:100])
    print(f"wrote {grid_path}: {min(n, 100)} samples, {E.row_label(args.solver, args.steps)} {args.steps} steps "
          f"({1000 * sec / n:.2f} ms/image incl. first-call costs); column k shows digit k")
    if args.no_table:
        return 0

    classifier = load_classifier(device=device)
    real, _ = load_split("heldout")
    train, _ = load_split("train")
    real, train = real.to(device), train.to(device)
    g = torch.Generator().manual_seed(args.seed)
    floor = train[torch.randperm(train.shape[0], generator=g)[:n].to(device)]
    rows = E.QUICK_ROWS if args.quick else E.FULL_ROWS
    reference = E.QUICK_REFERENCE if args.quick else E.REFERENCE
    print(f"comparing {len(rows) + (tuple(reference) not in rows)} samplers on the same {n} noise images "
          f"(FD/KID vs {real.shape[0]} held-out digits; long rows show progress on stderr) ...", flush=True)
    table = E.run_table(model, classifier, real, noise, labels, rows, reference=reference,
                        guidance_scale=args.guidance_scale, seed=args.seed, progress=True, real_floor=floor)
    text = E.format_table(table, reference)
    notes = (f"FD/KID: classifier-feature Frechet distance / kernel distance to {real.shape[0]} held-out images "
             f"(lower is better; 'real' row = the floor at {n} images). acc: samples classified as their "
             f"class. RMS: pixel RMS ([-1, 1]) to {E.SOLVER_NAMES[reference[0]]} {reference[1]} from the same "
             f"noise (deterministic reference; DDPM is stochastic, so its RMS is not a solver error).")
    print()
    print(text)
    print()
    print(notes)
    env = {"device": str(device), "torch": torch.__version__, "platform": platform.platform(),
           "threads": torch.get_num_threads(), "num_images": n, "seed": args.seed,
           "guidance_scale": args.guidance_scale, "quick": args.quick,
           "reference": list(reference), "seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n\n" + notes + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"env": env, "rows": E.rows_to_json(table)}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'table.md')} and results.json ({env['seconds']:.0f} s in all)")
    return 0

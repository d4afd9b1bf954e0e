"""`python -m fastdiff evaluate SAMPLES`: FD, KID, IS, precision/recall, class agreement and (with
--paired) the perceptual distance of a samples .npz, with bootstrap intervals. Under torchrun
rank 0 evaluates and the other ranks only check the arguments (no collective is entered)."""
from __future__ import annotations

import json
import os
import sys

from fastdiff.cli.common import UsageError, check_output_file


def register(subparsers) -> None:
    e = subparsers.add_parser("evaluate", help="FD, KID, IS, precision/recall (bootstrap 95%% intervals) of a "
                                               "samples .npz",
                              description="FD, KID, IS, precision and recall of SAMPLES against a reference, the "
                                          "class agreement, and the perceptual distance to a --paired run, in the "
                                          "bundled digits classifier's feature space, with bootstrap 95%% "
                                          "intervals.")
    e.add_argument("samples", metavar="SAMPLES", help="a samples.npz written by `generate`")
    evaluation_args(e)
    e.add_argument("--paired", metavar="NPZ", help="the samples.npz of a many-step reference run with the same "
                                                   "--seed and --num-images: adds the perceptual distance")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(func=_evaluate)


def evaluation_args(p) -> None:
    p.add_argument("--reference", default="digits", metavar="REF",
                   help="'digits' (held-out split, default), 'digits-train', or a .npz with uint8 'images'")
    p.add_argument("--features", default="classifier",
                   help="classifier (default): the bundled digits classifier's metrics; inception, lpips or clip: "
                        "also torchmetrics' Inception FID/KID/IS, LPIPS or CLIP score, when their weights are here")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates for the 95%% intervals (0: none)")
    p.add_argument("--is-splits", type=int, default=10, help="IS: the mean over this many splits (default: 10)")


def _evaluate(args) -> int:
    from fastdiff.cli.generate import rank
    from fastdiff.evaluation import EvaluationError, check_options, check_pair, evaluate, format_result, \
        load_reference, load_samples

    if args.json:
        check_output_file("--json", args.json)
    try:
        check_options(args.features, args.bootstrap, args.is_splits)
        samples = load_samples(args.samples)
        reference = load_reference(args.reference)
        paired = load_samples(args.paired, what="--paired") if args.paired else None
        check_pair(samples, reference, paired, args.features)
        if rank() != 0:
            return 0
        print(f"evaluate: {args.samples} ({samples.images.shape[0]} images), {args.bootstrap} bootstrap replicates "
              "...", file=sys.stderr, flush=True)
        result = evaluate(samples, reference, features=args.features, bootstrap=args.bootstrap, seed=0,
                          paired=paired, is_splits=args.is_splits)
    except EvaluationError as e:
        raise UsageError(str(e)) from e
    print(format_result(os.path.basename(args.samples), result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

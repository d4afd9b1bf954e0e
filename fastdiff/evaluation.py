"""FD and KID of a `samples.npz` against reference images, with bootstrap confidence intervals.

Feature space: the bundled digits classifier's (the demo's metric, `fastdiff.demo.evaluate`;
1x16x16 images). The point estimates are exactly the demo table's (torchmetrics FID/KID with
the classifier as feature extractor). The 95 % intervals come from a percentile bootstrap over
the generated samples (the reference set is held fixed, as it is when two samplers are
compared against it): each replicate resamples the samples' features with replacement and
recomputes FD, and KID on `kid_subsets` random subsets. A resample repeats images, which
biases both upwards if left alone: KID leaves pairs of copies of one image out of its
unbiased estimate, and the FD replicates are shifted back by their mean excess over the
point estimate (the bootstrap bias estimate). Two samplers evaluated on equal numbers of
images against the same reference differ beyond noise when their intervals do not overlap.

An Inception feature space needs torch-fidelity's FID Inception weights, which torchmetrics
downloads on first use; fastdiff never downloads, so it is reported as not available.
"""
from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

DIGITS_REFERENCES = ("digits", "digits-train")  # the bundled held-out split (360 images) / training split
FEATURE_SPACES = ("classifier", "inception")


class EvaluationError(ValueError):
    """Bad input to `evaluate` (raised before any feature is computed); the message names it."""


@dataclass
class Samples:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)


def load_samples(path: str, what: str = "SAMPLES") -> Samples:
    """A `samples.npz` of `python -m fastdiff generate` (or any .npz with uint8 `images` (N, C, H, W))."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing, truncated, not an .npz
        raise EvaluationError(f"{what}: cannot read {path!r} as .npz ({getattr(e, 'strerror', None) or e})") from e
    images = arrays.get("images")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] < 2:
        got = "no 'images'" if images is None else f"'images' {images.dtype} {images.shape}"
        raise EvaluationError(f"{what}: expected uint8 'images' shaped (N >= 2, C, H, W) in {path!r}, got {got}")
    labels = arrays.get("cond_class_labels")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != images.shape[0]
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise EvaluationError(f"{what}: expected integer 'cond_class_labels' shaped ({images.shape[0]},) (one per "
                              f"image) in {path!r}, got {labels.dtype} {labels.shape}")
    try:
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    except ValueError as e:
        raise EvaluationError(f"{what}: 'meta' in {path!r} is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise EvaluationError(f"{what}: 'meta' in {path!r} is not a JSON object")
    return Samples(torch.from_numpy(images), None if labels is None else torch.from_numpy(labels), meta)


def load_reference(ref: str) -> torch.Tensor:
    """'digits' (held-out split), 'digits-train', or a .npz like `load_samples` reads: uint8 (N, C, H, W)."""
    if ref in DIGITS_REFERENCES:
        from fastdiff.demo.data import load_split

        x, _ = load_split("heldout" if ref == "digits" else "train")
        return ((x + 1) * 127.5).round().to(torch.uint8)  # the same quantisation as saved samples
    return load_samples(ref, what="--reference").images


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1], the range the models and the classifier use."""
    return images.float() / 127.5 - 1.0


def check_options(features: str, bootstrap: int) -> None:
    """The feature space and the bootstrap count (the commands check them before any sampling)."""
    if features not in FEATURE_SPACES:
        raise EvaluationError(f"--features: expected one of {FEATURE_SPACES}, got {features!r}")
    if features == "inception":
        raise EvaluationError("--features inception: not available: torchmetrics' Inception extractor downloads "
                              "its weights on first use, and fastdiff never downloads; use --features classifier")
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise EvaluationError(f"--bootstrap: expected >= 0 replicates, got {bootstrap}")


def evaluate(samples: Samples, reference: torch.Tensor, *, features: str = "classifier", bootstrap: int = 100,
             seed: int = 0, device="cpu") -> dict:
    """FD, KID (+ std over subsets), acc (when samples carry class labels) and 95 % bootstrap
    intervals fd_ci, kid_ci. Raises EvaluationError on input that does not fit."""
    check_options(features, bootstrap)
    check_pair(samples, reference)
    with _one_thread():
        return _evaluate(samples, reference, features, bootstrap, seed, device)


def check_pair(samples: Samples, reference: torch.Tensor) -> None:
    """The samples fit the feature space and the reference."""
    if tuple(samples.images.shape[1:]) != (1, 16, 16):
        raise EvaluationError(f"SAMPLES: the digits classifier's feature space needs 1x16x16 images, got "
                              f"{'x'.join(map(str, samples.images.shape[1:]))}")
    if tuple(reference.shape[1:]) != tuple(samples.images.shape[1:]):
        raise EvaluationError(f"--reference: images are {'x'.join(map(str, reference.shape[1:]))}, the samples "
                              f"{'x'.join(map(str, samples.images.shape[1:]))}")
    if reference.shape[0] < 2:
        raise EvaluationError(f"--reference: needs at least 2 images, got {reference.shape[0]}")


@contextlib.contextmanager
def _one_thread():
    """A 0.1M-parameter classifier and 64x64 matrices: extra CPU threads only add synchronisation
    (one KID subset took 0.75 ms on 1 thread, 57 ms on 2 cores shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _evaluate(samples, reference, features, bootstrap, seed, device) -> dict:
    from fastdiff.demo import load_classifier
    from fastdiff.demo.classifier import FeatureExtractor
    from fastdiff.demo.evaluate import FeatureMetrics

    classifier = load_classifier(device=device)
    fake, real = to_float(samples.images).to(device), to_float(reference).to(device)
    metrics = FeatureMetrics(classifier, real, seed=seed)
    out = metrics(fake, samples.labels)
    out.update(num_samples=fake.shape[0], num_reference=real.shape[0], features=features, bootstrap=bootstrap)
    if bootstrap:
        extract = FeatureExtractor(classifier)
        f_fake, f_real = extract(fake).double(), extract(real).double()
        out["fd_ci"], out["kid_ci"] = _bootstrap(f_fake, f_real, bootstrap, seed, metrics.kid_subset_size,
                                                 metrics.kid_subsets)
    return out


def _bootstrap(f_fake, f_real, replicates, seed, kid_subset_size, kid_subsets):
    """(FD interval, KID interval) from `replicates` resamplings of the sample features."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(seed)
    n, m = f_fake.shape[0], f_real.shape[0]
    k = min(kid_subset_size, n, m)
    mu_r, cov_r = f_real.mean(0), torch.cov(f_real.T)
    fds, kids = [], []
    for _ in range(replicates):
        idx = torch.randint(n, (n,), generator=g)
        f = f_fake[idx]
        fds.append(float(_compute_fid(f.mean(0), torch.cov(f.T), mu_r, cov_r)))
        subsets = [torch.randperm(n, generator=g)[:k] for _ in range(kid_subsets)]
        kids.append(float(np.mean([_mmd_distinct(f_real[torch.randperm(m, generator=g)[:k]], f[s], idx[s])
                                   for s in subsets])))
    # FD: a resample repeats images, which shrinks the covariance and lifts every replicate's FD
    # by about the same amount; shift the replicates back by that bootstrap bias estimate.
    bias = float(np.mean(fds)) - float(_compute_fid(f_fake.mean(0), torch.cov(f_fake.T), mu_r, cov_r))
    return _interval(np.maximum(np.asarray(fds) - bias, 0.0)), _interval(kids)  # FD >= 0; KID's estimate need not be


def _mmd_distinct(real, fake, source):
    """KID's unbiased polynomial-kernel MMD^2 (torchmetrics' kernel), leaving out pairs of fake
    features that are copies of one image (`source`: its index): a copy's kernel value with
    itself would count as a pair of distinct images and bias the resampled KID upwards."""
    from torchmetrics.image.kid import poly_kernel

    k_rr, k_ff, k_rf = poly_kernel(real, real), poly_kernel(fake, fake), poly_kernel(real, fake)
    r = real.shape[0]
    distinct = source[:, None] != source[None, :]
    return float((k_rr.sum() - k_rr.diagonal().sum()) / (r * (r - 1)) + k_ff[distinct].mean() - 2 * k_rf.mean())


def _interval(values) -> list:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def format_result(name: str, r: dict) -> str:
    """One line: FD [CI], KID x1e3 [CI], acc."""
    fd = f"FD {r['fd']:.3f}" + (f" [{r['fd_ci'][0]:.3f}, {r['fd_ci'][1]:.3f}]" if "fd_ci" in r else "")
    kid = f"KID x1e3 {1e3 * r['kid']:.2f}" + (f" [{1e3 * r['kid_ci'][0]:.2f}, {1e3 * r['kid_ci'][1]:.2f}]"
                                              if "kid_ci" in r else "")
    acc = f", acc {100 * r['acc']:.1f} %" if "acc" in r else ""
    return f"{name}: {fd}, {kid}{acc} ({r['num_samples']} samples vs {r['num_reference']} reference images)"

"""The metrics of a `samples.npz` against reference images, with bootstrap confidence intervals.

Feature space: the bundled digits classifier's (the demo's metric, `fastdiff.demo.evaluate`;
1x16x16 images), in place of Inception's:
* FD and KID: the demo table's point estimates (torchmetrics FID/KID with the classifier as
  feature extractor).
* IS: the Inception score's formula on the classifier's class probabilities (mean over splits).
* precision and recall: k-nearest-neighbour manifolds of the features (Kynkaanniemi et al. 2019).
* class agreement (`acc`): how often the classifier finds the class an image was generated for,
  the class-conditional counterpart of a CLIP score.
* perceptual distance: from each image to the image a many-step reference run made from the
  same noise and condition, with unit-normalised activations of the classifier's four
  convolution layers, spatially averaged (LPIPS's form, unlearned weights: not LPIPS).
* PPL (`sampler_ppl`): that distance along slerps between noises, through the sampler.

The 95 % intervals are percentile bootstraps over the generated samples (the reference set is
held fixed, as it is when two samplers are compared against it). A resample repeats images:
KID leaves pairs of copies of one image out of its unbiased estimate, precision and recall
never count a copy as a neighbour, and the statistics of the set's spread (FD, IS, recall) are
shifted back by the replicates' mean excess over the point estimate (the bootstrap bias
estimate). Two samplers evaluated on equal numbers of images against the same reference differ
beyond noise when their intervals do not overlap.

`features="inception" | "lpips" | "clip"` adds the real Inception FID/KID/IS, LPIPS or CLIP
score (`fastdiff.external_metrics`) when their weights are on this machine; fastdiff never
downloads, so otherwise the options check names what to download and where it goes.
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
FEATURE_SPACES = ("classifier", "inception", "lpips", "clip")


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


def check_options(features: str, bootstrap: int, is_splits: int = 10) -> None:
    """The feature space, the bootstrap count and IS's splits (the commands check them before any sampling)."""
    if features not in FEATURE_SPACES:
        raise EvaluationError(f"--features: expected one of {FEATURE_SPACES}, got {features!r}")
    if features != "classifier":
        from fastdiff.external_metrics import missing

        why = missing(features)
        if why:
            raise EvaluationError(why)
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise EvaluationError(f"--bootstrap: expected >= 0 replicates, got {bootstrap}")
    if not isinstance(is_splits, int) or isinstance(is_splits, bool) or is_splits < 1:
        raise EvaluationError(f"--is-splits: expected >= 1 splits, got {is_splits}")


def evaluate(samples: Samples, reference: torch.Tensor, *, features: str = "classifier", bootstrap: int = 100,
             seed: int = 0, device="cpu", paired: Optional[Samples] = None, is_splits: int = 10) -> dict:
    """FD, KID (+ std over subsets), IS (+ std over splits), precision and recall, the class
    agreement `acc` (when samples carry class labels) and the perceptual distance to `paired`
    (the many-step reference run from the same seed: image i from the same noise and condition),
    each with a 95 % bootstrap interval `<name>_ci`. Raises EvaluationError on input that does not fit."""
    check_options(features, bootstrap, is_splits)
    check_pair(samples, reference, paired, features)
    with _one_thread():
        return _evaluate(samples, reference, features, bootstrap, seed, device, paired, is_splits)


def check_pair(samples: Samples, reference: torch.Tensor, paired: Optional[Samples] = None,
               features: str = "classifier") -> None:
    """The samples fit the feature space, the reference and the paired run."""
    if tuple(samples.images.shape[1:]) != (1, 16, 16):
        raise EvaluationError(f"SAMPLES: the digits classifier's feature space needs 1x16x16 images, got "
                              f"{'x'.join(map(str, samples.images.shape[1:]))}")
    if tuple(reference.shape[1:]) != tuple(samples.images.shape[1:]):
        raise EvaluationError(f"--reference: images are {'x'.join(map(str, reference.shape[1:]))}, the samples "
                              f"{'x'.join(map(str, samples.images.shape[1:]))}")
    if reference.shape[0] < 2:
        raise EvaluationError(f"--reference: needs at least 2 images, got {reference.shape[0]}")
    if paired is not None:
        _check_paired(samples, paired)
    if features == "lpips" and paired is None:
        raise EvaluationError("--features lpips: LPIPS compares each image with the paired many-step run's: give "
                              "--paired (compare: --perceptual-reference SOLVER:STEPS)")
    if features == "clip" and samples.labels is None:
        raise EvaluationError("--features clip: the CLIP score needs the samples' cond_class_labels")


def _check_paired(samples: Samples, paired: Samples) -> None:
    """`paired` holds image i of `samples` sampled from the same noise and condition."""
    if paired.images.shape != samples.images.shape:
        raise EvaluationError(f"--paired: {tuple(paired.images.shape)} images, the samples "
                              f"{tuple(samples.images.shape)}: expected the same images from another sampler")
    if (paired.labels is None) != (samples.labels is None) or (
            samples.labels is not None and not torch.equal(paired.labels, samples.labels)):
        raise EvaluationError("--paired: its cond_class_labels differ from the samples': not the same conditions")
    for key in ("seed", "num_images", "model"):
        if key in paired.meta and key in samples.meta and paired.meta[key] != samples.meta[key]:
            raise EvaluationError(f"--paired: {key} {paired.meta[key]!r}, the samples {samples.meta[key]!r}: "
                                  "not the same noises")


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


def _evaluate(samples, reference, features, bootstrap, seed, device, paired, is_splits) -> dict:
    from fastdiff.demo import load_classifier
    from fastdiff.demo.classifier import FeatureExtractor
    from fastdiff.demo.evaluate import FeatureMetrics

    classifier = load_classifier(device=device)
    fake, real = to_float(samples.images).to(device), to_float(reference).to(device)
    metrics = FeatureMetrics(classifier, real, seed=seed)
    out = metrics(fake, samples.labels)
    out.update(num_samples=fake.shape[0], num_reference=real.shape[0], features=features, bootstrap=bootstrap)
    extract = FeatureExtractor(classifier)
    f_fake, f_real = extract(fake).double(), extract(real).double()
    with torch.no_grad():
        probs = torch.softmax(classifier(fake).double(), 1)
    n, g = fake.shape[0], torch.Generator().manual_seed(seed)
    splits = min(is_splits, n)
    out["is"], out["is_std"] = inception_score(probs, splits)
    manifolds = Manifolds(f_real, f_fake)
    out["precision"], out["recall"] = manifolds.precision_recall()
    out.update(is_splits=splits, knn=manifolds.k)
    per_image = {}
    if samples.labels is not None:
        per_image["acc"] = (probs.argmax(1).cpu() == samples.labels).double()
    if paired is not None:
        c64 = load_classifier(device=device, dtype=torch.float64)
        per_image["perceptual"] = perceptual_distance(c64, fake.double(),
                                                      to_float(paired.images).to(device).double()).cpu()
        out["perceptual"] = float(per_image["perceptual"].mean())
    if features != "classifier":
        from fastdiff.external_metrics import compute

        out.update(compute(features, samples.images, reference, samples.labels,
                           None if paired is None else paired.images, splits))
    if bootstrap:
        out["fd_ci"], out["kid_ci"] = _bootstrap(f_fake, f_real, bootstrap, seed, metrics.kid_subset_size,
                                                 metrics.kid_subsets)
        replicates = [torch.randint(n, (n,), generator=g) for _ in range(bootstrap)]
        # IS and recall measure the set's diversity, which repeated images lower (IS) or raise
        # (recall: fewer distinct points, larger k-NN balls); precision is a mean over images
        out["is_ci"] = _debiased_interval([inception_score(probs[i], splits)[0] for i in replicates], out["is"],
                                          1.0, probs.shape[1])  # 1 <= IS <= the number of classes
        pr = [manifolds.precision_recall(i) for i in replicates]
        out["precision_ci"] = _interval([p for p, _ in pr])
        out["recall_ci"] = _debiased_interval([r for _, r in pr], out["recall"], 0.0, 1.0)
        for name, values in per_image.items():
            out[f"{name}_ci"] = _interval([float(values[i].mean()) for i in replicates])
    return out


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple:
    """(mean, std over splits) of exp(mean_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the
    split: the Inception score's formula, here on the digits classifier's class probabilities
    (N, classes). The N rows are cut into `splits` consecutive parts of (nearly) equal size."""
    scores = []
    for p in torch.tensor_split(probs.double(), splits):
        kl = (torch.xlogy(p, p) - torch.xlogy(p, p.mean(0, keepdim=True))).sum(1)  # 0 log 0 = 0
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


class Manifolds:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake features against real ones:
    each set's manifold is the union of balls around its points, of radius the distance to the
    point's k-th nearest neighbour in the set. Precision: the fraction of fake points inside the
    real manifold; recall: the fraction of real points inside the fake manifold. k = 3 (the
    paper's), fewer when a set has 3 points or less."""

    def __init__(self, real: torch.Tensor, fake: torch.Tensor, k: int = 3):
        self.k = min(k, real.shape[0] - 1, fake.shape[0] - 1)
        self.d_ff, self.d_rf = _distances(fake, fake), _distances(real, fake)
        self.r_real = _knn_radius(_distances(real, real), torch.arange(real.shape[0]), self.k)

    def precision_recall(self, index: Optional[torch.Tensor] = None) -> tuple:
        """(precision, recall) of the fake points `index` (a bootstrap resample: repeats allowed;
        copies of one point are not each other's neighbours); default all of them."""
        if index is None:
            index = torch.arange(self.d_ff.shape[0])
        d_rf = self.d_rf[:, index]
        r_fake = _knn_radius(self.d_ff[index][:, index], index, self.k)
        precision = (d_rf <= self.r_real[:, None]).any(0).double().mean()
        recall = (d_rf <= r_fake[None, :]).any(1).double().mean()
        return float(precision), float(recall)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, float64, computed directly (cdist's matrix-product form rounds a
    point's distance to itself to a small positive number)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radius(d: torch.Tensor, source: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest point among those of another source (inf if fewer)."""
    d = d.masked_fill(source[:, None] == source[None, :], float("inf"))
    return d.kthvalue(k, dim=1).values


def perceptual_distance(classifier, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image pair (N,): the sum over the digits classifier's four convolution layers of the
    spatial mean of |u(a) - u(b)|^2, u the activations normalised to unit length over channels at
    each position. LPIPS's form with every channel weighted 1 (LPIPS learns the weights on human
    judgements; this is not LPIPS). a, b: images in [-1, 1] of the classifier's dtype."""
    with torch.no_grad():
        total = 0
        for x, y in zip(classifier.activations(a), classifier.activations(b)):
            x, y = (v / (v.norm(dim=1, keepdim=True) + 1e-10) for v in (x, y))
            total = total + (x - y).pow(2).sum(1).mean((1, 2))
    return total


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per row: along the great circle from a's direction to b's (fraction t of the angle), with
    the norm interpolated linearly; a, b (N, ...), t (N,). Float64."""
    a, b, t = a.flatten(1).double(), b.flatten(1).double(), t.double()[:, None]
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(1, keepdim=True).clamp(-1, 1))
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    return ((1 - t) * na + t * nb) * direction


def path_lengths(sample, noise_a: torch.Tensor, noise_b: torch.Tensor, t: torch.Tensor, distance,
                 eps: float = 1e-4) -> torch.Tensor:
    """Per pair (N,): the perceptual path length of the noise-to-image map `sample` (noise batch ->
    image batch) at fraction t of the slerp from noise_a to noise_b (Karras et al. 2019):
    distance(sample(z(t)), sample(z(t + eps))) / eps^2. t in [0, 1 - eps]."""
    shape = noise_a.shape
    x0 = sample(slerp(noise_a, noise_b, t).view(shape).to(noise_a.dtype))
    x1 = sample(slerp(noise_a, noise_b, t + eps).view(shape).to(noise_a.dtype))
    return distance(x0, x1) / eps ** 2


def sampler_ppl(workload, pairs: int, seed: int = 0, device="cpu", bootstrap: int = 100, eps: float = 1e-4) -> dict:
    """PPL of a `fastdiff.Workload`'s noise-to-image map: the `trimmed_mean` of `path_lengths` over `pairs`
    noise pairs (seeded by `seed`; pair p conditioned as image p, its SDE step noise, if any, the
    same at both ends), measured with `perceptual_distance` on the images clamped to [-1, 1] and
    not quantised (eps-sized changes are far below one uint8 level); 95 % bootstrap interval
    over the pairs."""
    from fastdiff.demo import load_classifier
    from fastdiff.generation import sample_images

    g = torch.Generator().manual_seed(seed)
    shape = (pairs, *workload.shape)
    noise_a, noise_b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(pairs, generator=g, dtype=torch.float64) * (1 - eps)
    index = torch.arange(pairs)
    classifier = load_classifier(device=device, dtype=torch.float64)

    def sample(noise):
        return sample_images(workload, index, seed, device, noise=noise)[0].double().clamp(-1, 1)

    with _one_thread():
        lengths = path_lengths(sample, noise_a, noise_b, t, lambda a, b: perceptual_distance(classifier, a, b), eps)
    out = {"ppl": trimmed_mean(lengths), "ppl_pairs": pairs}
    if bootstrap:
        out["ppl_ci"] = _interval([trimmed_mean(lengths[torch.randint(pairs, (pairs,), generator=g)])
                                   for _ in range(bootstrap)])
    return out


def trimmed_mean(values: torch.Tensor) -> float:
    """The mean of the values between their 1st and 99th percentiles, taken as the nearest values
    outward (PPL's convention, Karras et al. 2019: a pair that straddles a jump between two images
    would otherwise dominate). Below 102 values nothing is dropped."""
    v = values.double().cpu().numpy()
    low, high = np.percentile(v, 1, method="lower"), np.percentile(v, 99, method="higher")
    return float(v[(v >= low) & (v <= high)].mean())


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
    fd = float(_compute_fid(f_fake.mean(0), torch.cov(f_fake.T), mu_r, cov_r))
    return _debiased_interval(fds, fd, low=0.0), _interval(kids)  # FD >= 0; KID's estimate need not be


def _debiased_interval(values, point: float, low: float = -np.inf, high: float = np.inf) -> list:
    """The percentile interval of replicates that repeat images, which moves a statistic of the
    set's spread (FD, IS, recall) by about the same amount in every replicate: shifted back by
    that bootstrap bias estimate (the replicates' mean minus the point estimate), within [low, high]."""
    values = np.asarray(values, dtype=np.float64)
    return _interval(np.clip(values - (values.mean() - point), low, high))


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


# (result key, column name, scale, format): the metrics of `evaluate` and `sampler_ppl`, in the
# order of the comparison table
COLUMNS = (("fd", "FD", 1, ".2f"), ("is", "IS", 1, ".2f"), ("kid", "KID x1e3", 1e3, ".2f"),
           ("perceptual", "perceptual distance", 1, ".4f"), ("acc", "class agreement %", 100, ".1f"),
           ("ppl", "PPL", 1, ".3g"), ("precision", "precision", 1, ".3f"), ("recall", "recall", 1, ".3f"))


def format_value(r: dict, key: str, scale: float = 1, fmt: str = ".2f") -> str:
    """"value [low, high]" (the 95 % interval where computed), "-" where the metric is absent."""
    if key not in r:
        return "-"
    ci = f" [{scale * r[key + '_ci'][0]:{fmt}}, {scale * r[key + '_ci'][1]:{fmt}}]" if key + "_ci" in r else ""
    return f"{scale * r[key]:{fmt}}{ci}"


def format_result(name: str, r: dict) -> str:
    """One line: every metric present, with its interval."""
    from fastdiff.external_metrics import COLUMNS as EXTERNAL

    metrics = ", ".join(f"{label} {format_value(r, key, scale, fmt)}" for key, label, scale, fmt in COLUMNS + EXTERNAL
                        if key in r)
    return f"{name}: {metrics} ({r['num_samples']} samples vs {r['num_reference']} reference images)"

"""Sampler comparison on the bundled digits model: speed, sample quality, solver accuracy.

Metrics (the literature's sampler-comparison table, scaled down to 16x16 digits):

* ms/image: wall time of `Sampler.sample` for the whole batch divided by the batch size,
  on the fastest backend (`backend="auto"`; on a GPU the loop is one CUDA graph, each row run
  once untimed first, and CUDA is synchronised around the timed call; on a CPU after one
  warm-up call, with the progress callback of long rows included).
* FD: the Fréchet distance between Gaussians fitted to the metric classifier's (standardised,
  64-d) penultimate features of the samples and of the held-out real images -- FID with the
  digits classifier in place of Inception (torchmetrics `FrechetInceptionDistance` with a
  custom `feature` module). Biased upwards at small sample counts: compare rows of one table,
  and against the "real" row (training images vs held-out images, same count), the floor.
* KID: the kernel inception distance in the same feature space (unbiased polynomial-kernel
  MMD^2, mean over random subsets; torchmetrics `KernelInceptionDistance`), seeded.
* acc: the fraction of samples the classifier assigns to the class they were generated for.
* RMS: root-mean-square pixel distance ([-1, 1] scale) to the deterministic high-step
  reference from the same initial noise: DDIM with 1000 steps (every training timestep,
  eta = 0, i.e. the probability-flow ODE solved to well below the errors measured here;
  `--quick` uses DPM-Solver++ 2M with 100 steps instead, see QUICK_REFERENCE). It
  measures solver error, not quality. DDPM is stochastic (fresh noise every step), so its RMS
  is to that same ODE reference and mostly measures its own injected noise, not a solver error.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

import fastdiff
from fastdiff.demo.classifier import FeatureExtractor

REFERENCE = ("ddim", 1000)  # the deterministic high-step reference of the RMS column


@dataclass
class Row:
    """One row of the comparison table."""

    label: str
    solver: str
    steps: int
    ms_per_image: Optional[float] = None
    fd: Optional[float] = None
    kid: Optional[float] = None
    kid_std: Optional[float] = None
    acc: Optional[float] = None
    rms: Optional[float] = None
    note: str = ""


# rows: (solver, steps). Full table and the --quick one.
FULL_ROWS = [("ddpm", 1000), ("ddim", 1000), ("ddim", 100), ("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20),
             ("dpmpp_2m", 10), ("dpmpp_2m", 8), ("dpmpp_3m", 8), ("euler", 20), ("ddim", 8), ("dpmpp_2m", 4)]
QUICK_ROWS = [("ddim", 20), ("dpmpp_2m", 20), ("dpmpp_2m", 8), ("dpmpp_3m", 8), ("ddim", 8)]
# --quick's RMS reference: 100 second-order steps land closer to DDIM 1000 than DDIM 250 does
# (RMS 0.0045 vs 0.0103 on 8 images of the bundled model; part of the 0.0045 is DDIM 1000's
# own first-order error), at 40 % of the cost.
QUICK_REFERENCE = ("dpmpp_2m", 100)

SOLVER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_1m": "DPM-Solver++ 1M", "dpmpp_2m": "DPM-Solver++ 2M",
                "dpmpp_3m": "DPM-Solver++ 3M", "dpmpp_2m_sde": "DPM-Solver++ 2M SDE", "euler": "Euler",
                "euler_ancestral": "Euler ancestral"}


def make_noise(n: int, seed: int, shape=(1, 16, 16), device="cpu") -> torch.Tensor:
    """Seeded standard normal noise, drawn on the CPU (identical on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(device)


def balanced_labels(n: int, num_classes: int = 10, device="cpu") -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: image i is generated for class i % 10."""
    return (torch.arange(n) % num_classes).to(device)


class _Bar:
    """A stderr progress bar for a long table row: redrawn in place on a terminal, a line at
    every quarter otherwise (logs)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // (100 if self.tty else 4))
        self.t0 = time.perf_counter()

    def __call__(self, i: int, x) -> None:
        done = i + 1
        if done % self.every and done != self.total:
            return
        if not self.tty:
            self.stream.write(f"  {self.label}: {done}/{self.total} steps ({time.perf_counter() - self.t0:.1f} s)\n")
            self.stream.flush()
            return
        w = 30
        f = w * done // self.total
        self.stream.write(f"\r  {self.label:<24} [{'#' * f}{'.' * (w - f)}] {done}/{self.total}")
        if done == self.total:
            self.stream.write("\r" + " " * (w + 40) + "\r")
        self.stream.flush()


def generate(model, noise: torch.Tensor, labels: torch.Tensor, solver: str, steps: int, *,
             guidance_scale: float = 1.0, seed: int = 0, progress: bool = False, backend: str = "auto",
             label: str = "", warm: bool = False) -> tuple:
    """Sample from the class-conditional `model` with `fastdiff`. Returns (x0, seconds).

    Classifier-free guidance (w != 1) runs the model on a doubled batch (null label for the
    unconditional half). `seed` seeds the generator of stochastic solvers (DDPM). On a GPU the
    whole loop runs as one CUDA graph where it can be captured (`cuda_graph="auto"`; no
    progress bar then: the host does not see the steps); `warm=True` runs the plan once
    untimed first, so capture and first-call costs stay out of the timing."""
    sampler = fastdiff.Sampler(solver=solver, steps=steps, schedule="linear", prediction="epsilon",
                               model_time="timestep", backend=backend)
    cond = {"class_labels": labels}
    uncond = {"class_labels": torch.full_like(labels, model.null_class)} if guidance_scale != 1.0 else None
    on_gpu = noise.device.type == "cuda"
    graph = "auto" if (on_gpu and backend != "reference") else False
    cb = _Bar(label or f"{solver} {steps}", sampler.steps) if (progress and not graph) else None
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with torch.inference_mode():
        if warm:
            sampler.sample(model, noise, generator=torch.Generator(device=noise.device).manual_seed(seed + 1),
                           guidance_scale=guidance_scale, cond=cond, uncond=uncond, cuda_graph=graph)
        g = torch.Generator(device=noise.device).manual_seed(seed + 1)
        sync()
        t0 = time.perf_counter()
        x = sampler.sample(model, noise, generator=g, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                           callback=cb, cuda_graph=graph)
        sync()
        seconds = time.perf_counter() - t0
    return x, seconds


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square distance over all pixels (float64)."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


class FeatureMetrics:
    """FD and KID in the classifier's feature space against a fixed set of real images."""

    def __init__(self, classifier, real: torch.Tensor, *, kid_subset_size: int = 100, kid_subsets: int = 50,
                 seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance

        feat = FeatureExtractor(classifier)
        self.device = real.device
        self.seed = seed
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        # sync_on_compute=False: the images given are all the images, also under torchrun, where
        # only rank 0 evaluates (a sync would wait for ranks that never compute)
        self.fid = FrechetInceptionDistance(feature=feat, normalize=True, reset_real_features=False,
                                            sync_on_compute=False).to(self.device)
        self.fid.update(real, real=True)
        self.real = real
        self.classifier = classifier
        self._feat = feat

    def _kid(self, fake: torch.Tensor):
        from torchmetrics.image.kid import KernelInceptionDistance

        k = min(self.kid_subset_size, fake.shape[0], self.real.shape[0])
        with warnings.catch_warnings():  # "will save all extracted features in buffer": a few hundred here
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=self._feat, normalize=True, subsets=self.kid_subsets,
                                          subset_size=k, sync_on_compute=False).to(self.device)
        kid.update(self.real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            m, s = kid.compute()
        return float(m), float(s)

    def __call__(self, fake: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Metrics of generated images (clamped to [-1, 1], like saved images)."""
        fake = fake.float().clamp(-1, 1).to(self.device)
        self.fid.reset()
        self.fid.update(fake, real=False)
        out = {"fd": float(self.fid.compute())}
        out["kid"], out["kid_std"] = self._kid(fake)
        if labels is not None:
            with torch.no_grad():
                out["acc"] = float((self.classifier(fake).argmax(1) == labels.to(self.device)).float().mean())
        return out


def row_label(solver: str, steps: int) -> str:
    return f"{SOLVER_NAMES.get(solver, solver)}"


def run_table(model, classifier, real, noise, labels, rows: Sequence, *, reference=REFERENCE,
              guidance_scale: float = 1.0, seed: int = 0, progress: bool = True, backend: str = "auto",
              real_floor: Optional[torch.Tensor] = None, log=None) -> List[Row]:
    """Run every (solver, steps) row on the same noise and labels; RMS against `reference`
    (computed first, listed where it falls in `rows`, or added at the top when absent)."""
    metrics = FeatureMetrics(classifier, real, seed=seed)
    out: List[Row] = []
    if real_floor is not None:
        m = metrics(real_floor[: noise.shape[0]])
        out.append(Row("real (train split)", "-", 0, fd=m["fd"], kid=m["kid"], kid_std=m["kid_std"],
                       note="training images vs held-out: the floor at this sample count"))
    rows = list(rows)
    if reference is not None and tuple(reference) not in [tuple(r) for r in rows]:
        rows.insert(0, tuple(reference))
    # warm-up (one-time costs out of the timings)
    generate(model, noise[:2], labels[:2], "dpmpp_2m", 2, guidance_scale=guidance_scale, backend=backend)
    ref_x = None
    order = sorted(range(len(rows)), key=lambda i: tuple(rows[i]) != tuple(reference or ()))
    results = {}
    for i in order:
        solver, steps = rows[i]
        lab = f"{row_label(solver, steps)} {steps}"
        x, sec = generate(model, noise, labels, solver, steps, guidance_scale=guidance_scale, seed=seed,
                          progress=progress and steps >= 50, backend=backend, label=lab,
                          warm=noise.device.type == "cuda")
        if reference is not None and (solver, steps) == tuple(reference):
            ref_x = x
        m = metrics(x, labels)
        r = Row(row_label(solver, steps), solver, steps, ms_per_image=1000.0 * sec / noise.shape[0], fd=m["fd"],
                kid=m["kid"], kid_std=m["kid_std"], acc=m["acc"])
        if ref_x is not None:
            r.rms = rms(x, ref_x)
        if reference is not None and (solver, steps) == tuple(reference):
            r.note = "RMS reference"
        elif solver == "ddpm":
            r.note = "stochastic: RMS is vs the ODE reference"
        results[i] = r
        if log:
            log(r)
    out.extend(results[i] for i in range(len(rows)))
    return out


def format_table(rows: List[Row], reference=REFERENCE) -> str:
    ref = f"{SOLVER_NAMES[reference[0]]} {reference[1]}" if reference else "-"
    head = ["solver", "steps", "ms/image", "FD", "KID x1e3", "acc %", f"RMS vs {ref}", "note"]
    body = []
    for r in rows:
        body.append([
            r.label, str(r.steps) if r.steps else "-",
            f"{r.ms_per_image:.2f}" if r.ms_per_image is not None else "-",
            f"{r.fd:.2f}" if r.fd is not None else "-",
            f"{1e3 * r.kid:.1f}" if r.kid is not None else "-",
            f"{100 * r.acc:.1f}" if r.acc is not None else "-",
            ("0 (ref)" if r.note == "RMS reference" else f"{r.rms:.4f}") if r.rms is not None else "-",
            r.note,
        ])
    right = {1, 2, 3, 4, 5, 6}
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def rows_to_json(rows: List[Row]) -> list:
    return [asdict(r) for r in rows]

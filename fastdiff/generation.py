"""`fastdiff.generate()`: sample many images reproducibly, in restartable shards, on one
process or many (torch.distributed).

Reproducibility. Image i's noise -- the initial latent and every SDE/ancestral step's noise --
comes from its own generator, seeded by (seed, i) (`image_seed`), so what each image is given
does not depend on the batch or the process it lands in. The images are cut into shards of
`batch_size` consecutive indices, one batch each, and ranks take shards round-robin: every
batch the model sees is the same whatever the number of processes, so 1 and K processes write
the same file byte for byte. A different batch size gives the same noise, but the result is
bit-identical only if the model's per-image output does not depend on the batch (CPU
convolution kernels differ by ~1e-6 between batch sizes and thread counts: measured on the
bundled digits U-Net; after the uint8 rounding that moves an occasional pixel by one level).

Layout of `out_dir`:
    run.json            the run's identity (what decides the pixels); a restart must match it
    shards/NNNNNN.npz   one finished shard each: written to a temporary file, fsynced, then
                        renamed into place, so the set of these files is the index of finished
                        work and a killed run never leaves a partial shard under this name
                        (its *.tmp files are deleted on restart; a shard that does not
                        validate is sampled again)
    samples.npz         the merged result (rank 0): uint8 images (N, C, H, W) in index order,
                        the per-image conditioning tensors as cond_<name>, the plan and the
                        provenance (fastdiff version, git commit) as JSON strings
    grid.png            the first images (1- or 3-channel images only)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from fastdiff.demo.png import encode_png, image_grid, to_uint8
from fastdiff.sampler import Sampler

GRID_IMAGES = 100


class BadArgument(ValueError):
    """A bad argument to `generate` (raised before any model call); the message names it."""


@dataclass
class Workload:
    """What `python -m fastdiff generate --model module:function` gets from `function`: the model,
    its plan and how to condition and decode it.

    cond, uncond: image indices (int64 tensor) -> the model's keyword arguments for those images
        (batch-first tensors; the tensors of `cond` are saved with the samples as cond_<name>).
    decode: the final state -> images in [-1, 1] (a VAE decoder for a latent model); default none.
    """

    model: Callable
    sampler: Sampler
    shape: Sequence[int]
    cond: Optional[Callable[[torch.Tensor], Mapping]] = None
    uncond: Optional[Callable[[torch.Tensor], Mapping]] = None
    guidance_scale: float = 1.0
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


@dataclass
class GenerateResult:
    path: str  # samples.npz (rank 0; on other ranks the path it will have)
    grid_path: Optional[str]  # None: images with neither 1 nor 3 channels get no grid
    generated: int  # images this run sampled (all ranks); finished shards found on disk are not resampled
    seconds: float  # wall time of the sampling phase on this rank (the merge excluded)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else float("nan")


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image `index`'s generator: (seed, index) mixed by numpy's SeedSequence
    (independent streams for neighbouring indices and seeds)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices: Sequence[int], device) -> list:
    return [torch.Generator(device=device).manual_seed(image_seed(seed, int(i))) for i in indices]


def generate(model, sampler: Sampler, num_images: int, seed: int, batch_size: int, out_dir: str, *,
             shape: Sequence[int], cond=None, uncond=None, guidance_scale: float = 1.0, decode=None,
             device=None, cuda_graph=False, progress: bool = True, name: str = "") -> GenerateResult:
    """Sample `num_images` images into `out_dir` (see the module docstring for the layout and the
    guarantees), resuming from the finished shards a killed run left there. Under an initialised
    torch.distributed process group every rank calls this with the same arguments and its own
    `device`; rank 0 merges. Returns where the result is and how fast this run sampled.

    model: `model(x, t, **cond)` as for `fastdiff.sample`; sampler: the plan; shape: one image's
    shape (C, H, W); cond/uncond/decode: see `Workload` (the images, in [-1, 1], are saved as
    uint8 0..255); device: where to sample (default: the
    model's parameters' device, else the CPU); cuda_graph: as for `Sampler.sample`; name: a label
    saved in the metadata (the CLI saves the --model spec).
    """
    check_count("num_images", num_images)
    check_count("batch_size", batch_size)
    check_count("seed", seed, minimum=0)
    if not isinstance(sampler, Sampler):
        raise BadArgument(f"sampler: expected a fastdiff.Sampler, got {type(sampler).__name__}")
    shape = tuple(shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise BadArgument(f"shape: expected one image's shape as positive integers, e.g. (3, 32, 32), got {shape}")
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world = _rank_and_world()
    identity = dict(num_images=num_images, seed=seed, batch_size=batch_size, shape=list(shape),
                    guidance_scale=float(guidance_scale), model=_model_fingerprint(model), name=name,
                    plan=sampler.describe())
    shard_dir = os.path.join(out_dir, "shards")
    on_rank0(lambda: _prepare_out_dir(out_dir, shard_dir, identity))
    fingerprint = _fingerprint(identity)
    shards = [(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]
    pending = [k for k in range(len(shards)) if not _shard_done(shard_dir, k, shards[k], fingerprint, rank == 0)]
    _barrier(world)  # every rank has listed the finished shards before any writes a new one
    mine = pending[rank::world]
    todo = sum(shards[k][1] - shards[k][0] for k in pending)
    bar = _Progress(todo, world) if progress and rank == 0 and todo else None
    t0 = time.perf_counter()
    for k in mine:
        indices = torch.arange(*shards[k])
        images, conds = _sample_shard(model, sampler, indices, seed, shape, device, cond, uncond, guidance_scale,
                                      decode, cuda_graph)
        _write_atomic(_shard_path(shard_dir, k),
                      dict(images=images, indices=indices.numpy(), fingerprint=np.str_(fingerprint), **conds))
        if bar:
            bar.update(len(indices))
    seconds = time.perf_counter() - t0
    if bar:
        bar.close()
    _barrier(world)
    path = os.path.join(out_dir, "samples.npz")
    grid_path = os.path.join(out_dir, "grid.png") if len(shape) == 3 and shape[0] in (1, 3) else None  # gray/RGB
    if rank == 0:
        _merge(shard_dir, shards, path, grid_path, identity)
    _barrier(world)
    return GenerateResult(path=path, grid_path=grid_path, generated=todo, seconds=seconds)


def check_count(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadArgument(f"{name}: expected an integer >= {minimum}, got {value!r}")


def check_out_dir(out_dir: str) -> None:
    """Create `out_dir` if needed and check a file can be written there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise BadArgument(f"out_dir: {out_dir!r} is not a writable directory ({e.strerror})") from e


def _model_device(model) -> torch.device:
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def _rank_and_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(fn, error_type=BadArgument):
    """fn() on rank 0 (None on the other ranks); an `error_type` exception it raises is raised,
    with its message, on every rank, so that none waits forever in a collective the others have
    left. Every rank calls this (one broadcast under torch.distributed)."""
    rank, world = _rank_and_world()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except error_type as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error_type(error)
    return result


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _model_fingerprint(model) -> str:
    """The model class and a hash of its weights: a restart with other weights is refused rather
    than mixed into the same samples."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    if isinstance(model, torch.nn.Module):
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(model).__qualname__}:{h.hexdigest()[:16]}"


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_run_dir(out_dir: str) -> Optional[dict]:
    """Check, before any model call, that `generate` can use `out_dir`: a writable directory whose
    shards/ is a directory and whose run.json, samples.npz and grid.png (where present) are
    files it can read or replace. Returns the identity in run.json (None: a new run)."""
    check_out_dir(out_dir)
    for name, want_dir in (("shards", True), ("samples.npz", False), ("grid.png", False)):
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and os.path.isdir(path) != want_dir:
            raise BadArgument(f"out_dir: {path!r} is {'a file' if want_dir else 'a directory'}, expected "
                              f"{'a directory of shards' if want_dir else 'a file'}; remove it or use a new out_dir")
    run_json = os.path.join(out_dir, "run.json")
    if not os.path.exists(run_json):
        return None
    try:
        with open(run_json) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not JSON, not UTF-8
        raise BadArgument(f"out_dir: cannot read {run_json!r} ({getattr(e, 'strerror', None) or e}); remove "
                          "the directory to start afresh, or use a new out_dir") from e
    if not isinstance(old, dict):
        raise BadArgument(f"out_dir: {run_json!r} is not a fastdiff run (expected a JSON object); remove the "
                          "directory to start afresh, or use a new out_dir")
    return old


def _differences(old, new, key: str) -> list:
    """'key: old -> new' for each differing leaf (the plan is a dict: name its entries)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def _prepare_out_dir(out_dir: str, shard_dir: str, identity: dict) -> None:
    """Create out_dir, check it is writable and that a run already there is this run."""
    old = check_run_dir(out_dir)
    os.makedirs(shard_dir, exist_ok=True)
    for name in os.listdir(shard_dir):  # partial writes of a killed run
        if name.endswith(".tmp"):
            os.remove(os.path.join(shard_dir, name))
    if old is not None:
        diffs = [d for key in identity for d in _differences(old.get(key), json.loads(json.dumps(identity[key])), key)]
        if diffs:
            first = diffs[0].split(":")[0].split(".")[0]
            what = {"model": "model (its weights)", "plan": "sampler (the plan)"}.get(first, first)
            raise BadArgument(f"{what}: out_dir {out_dir!r} holds another run (old -> new: {'; '.join(diffs)}); "
                              "pass the same arguments to resume it, or a new out_dir")
        return
    _write_bytes_atomic(os.path.join(out_dir, "run.json"), json.dumps(identity, indent=1).encode())


def _shard_path(shard_dir: str, k: int) -> str:
    return os.path.join(shard_dir, f"{k:06d}.npz")


def _shard_done(shard_dir: str, k: int, span, fingerprint: str, warn: bool) -> bool:
    path = _shard_path(shard_dir, k)
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as z:
            ok = str(z["fingerprint"]) == fingerprint and np.array_equal(z["indices"], np.arange(*span))
            ok = ok and z["images"].shape[0] == span[1] - span[0]
    except Exception:  # truncated or foreign file: zipfile, numpy and key errors alike
        ok = False
    if not ok and warn:
        warnings.warn(f"{path}: not a finished shard of this run; sampling it again", RuntimeWarning, stacklevel=3)
    return ok


def _sample_shard(model, sampler, indices, seed, shape, device, cond, uncond, guidance_scale, decode, cuda_graph):
    x, c = sample_images(Workload(model, sampler, shape, cond, uncond, guidance_scale, decode), indices, seed, device,
                         cuda_graph=cuda_graph)
    conds = {f"cond_{k}": v.detach().cpu().numpy() for k, v in c.items()
             if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(indices)}
    return to_uint8(x).numpy(), conds


def sample_images(w: Workload, indices: torch.Tensor, seed: int, device, noise: Optional[torch.Tensor] = None,
                  cuda_graph=False):
    """(images in the decoder's range, the model's conditioning) of images `indices`: image i
    conditioned as index i, its noise (the initial one unless `noise` is given, and every SDE
    step's) from its own generator (`image_seed(seed, i)`)."""
    gens = image_generators(seed, indices.tolist(), device)
    c = dict(w.cond(indices)) if w.cond else {}
    u = _on_device(w.uncond(indices), device) if w.uncond else None
    with torch.inference_mode():
        x = w.sampler.sample(w.model, None if noise is None else noise.to(device),
                             shape=None if noise is not None else (len(indices),) + tuple(w.shape), generator=gens,
                             device=device, guidance_scale=w.guidance_scale, cond=_on_device(c, device) or None,
                             uncond=u, cuda_graph=cuda_graph)
        if w.decode is not None:
            x = w.decode(x)
    return x, c


def _on_device(kwargs: Mapping, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _merge(shard_dir, shards, path, grid_path, identity) -> None:
    parts = []
    for k in range(len(shards)):
        with np.load(_shard_path(shard_dir, k)) as z:
            parts.append({n: z[n] for n in z.files if n not in ("indices", "fingerprint")})
    arrays = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
    meta = dict(identity, fastdiff_version=_version(), git_commit=git_commit(), torch_version=torch.__version__)
    plan = meta.pop("plan")
    arrays.update(plan=np.str_(json.dumps(plan)), meta=np.str_(json.dumps(meta, sort_keys=True)))
    _write_atomic(path, arrays)
    if grid_path:
        _write_bytes_atomic(grid_path, encode_png(image_grid(torch.from_numpy(arrays["images"][:GRID_IMAGES]))))


def _version() -> str:
    from fastdiff import __version__

    return __version__


def git_commit() -> str:
    """The commit of the fastdiff checkout (+ "-dirty" with uncommitted changes), else
    $FASTDIFF_COMMIT, else "unknown" (an installed wheel has no git metadata)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("FASTDIFF_COMMIT", "unknown")


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) that depends only on the arrays: sorted names, fixed
    timestamps (np.savez stamps the current time, so equal runs would differ byte-wise)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def _write_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    _write_bytes_atomic(path, npz_bytes(arrays))


def _write_bytes_atomic(path: str, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename: `path` is either absent or complete."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


class _Progress:
    """Rank 0's stderr progress: images/s and ETA, extrapolated to all ranks (they run the same
    batches at the same speed). Redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, world: int, stream=None):
        self.total, self.world, self.done = total, world, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self.next_line = time.perf_counter(), 0.1

    def update(self, n: int) -> None:
        self.done = min(self.total, self.done + n * self.world)
        frac = self.done / self.total if self.total else 1.0
        if not self.tty and frac < min(self.next_line, 1.0):
            return
        self.next_line = frac + 0.1
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        msg = f"generate: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f} s"
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

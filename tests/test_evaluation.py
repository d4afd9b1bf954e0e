"""fastdiff.evaluation's metrics against plain, independent computations on small random or
constructed inputs whose answer is known; compare under torchrun (two gloo processes) against
the one-process table."""
import itertools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.evaluation import Manifolds, inception_score, path_lengths, perceptual_distance, slerp, trimmed_mean

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_plain(p, splits):
    """exp(E KL(p(y|x) || p(y))) per split, by the textbook sum (numpy, 0 log 0 = 0)."""
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0)
        kl = [sum(q * math.log(q / m) for q, m in zip(row, marginal) if q > 0) for row in part]
        scores.append(math.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def test_inception_score_of_uniform_one_hot_and_random_probabilities():
    assert inception_score(torch.full((12, 10), 0.1), splits=3) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = torch.nn.functional.one_hot(torch.arange(40) % 10, 10).double()
    assert inception_score(one_hot, splits=4) == pytest.approx((10.0, 0.0))  # each split holds every class once
    assert inception_score(one_hot[:5], splits=1)[0] == pytest.approx(5.0)  # 5 classes, one image each
    torch.manual_seed(0)
    p = torch.distributions.Dirichlet(torch.full((7,), 0.3)).sample((23,))
    p[0, :3] = 0  # exact zeros: 0 log 0 = 0
    p = p / p.sum(1, keepdim=True)
    for splits in (1, 3, 23):
        assert inception_score(p, splits) == pytest.approx(_is_plain(p.double().numpy(), splits), rel=1e-10)


def _pr_plain(real, fake, k, source):
    """Precision and recall by loops: a ball per point, radius its k-th nearest neighbour among
    the points of another source."""
    def radius(points, src, i):
        d = sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if src[j] != src[i])
        return d[k - 1] if len(d) >= k else math.inf

    r_real = [radius(real, list(range(len(real))), i) for i in range(len(real))]
    r_fake = [radius(fake, source, j) for j in range(len(fake))]
    precision = np.mean([any(np.linalg.norm(f - real[i]) <= r_real[i] for i in range(len(real))) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - fake[j]) <= r_fake[j] for j in range(len(fake))) for r in real])
    return precision, recall


def test_precision_and_recall_of_identical_disjoint_and_random_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    assert Manifolds(x, x.clone()).precision_recall() == (1.0, 1.0)
    assert Manifolds(x, x + 1e3).precision_recall() == (0.0, 0.0)
    half = Manifolds(x, torch.cat([x[:10], x[:10] + 1e3]))  # half the fakes are real points, 10 of 30 reals covered
    p, r = half.precision_recall()
    assert p == 0.5 and r >= 10 / 30
    real, fake = torch.randn(9, 3, generator=g), torch.randn(11, 3, generator=g) + 0.5
    for k in (1, 3):
        m = Manifolds(real, fake, k=k)
        assert m.precision_recall() == pytest.approx(_pr_plain(real.double().numpy(), fake.double().numpy(), k,
                                                               list(range(11))))
        index = torch.tensor([0, 0, 3, 3, 3, 5, 7, 8, 8, 9, 10])  # a bootstrap resample: copies are not neighbours
        assert m.precision_recall(index) == pytest.approx(
            _pr_plain(real.double().numpy(), fake[index].double().numpy(), k, index.tolist()))


def test_perceptual_distance_is_the_plain_per_position_sum():
    from fastdiff.demo.classifier import DigitClassifier

    torch.manual_seed(2)
    c = DigitClassifier(width=3, feature_dim=4).double().eval()
    a, b = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1, torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    got = perceptual_distance(c, a, b)
    want = np.zeros(3)
    with torch.no_grad():
        layers = list(zip(c.activations(a), c.activations(b)))
    for fa, fb in layers:
        fa, fb = fa.numpy(), fb.numpy()
        for n, y, x in itertools.product(range(3), range(fa.shape[2]), range(fa.shape[3])):
            u, v = fa[n, :, y, x], fb[n, :, y, x]
            u, v = u / (np.sqrt((u * u).sum()) + 1e-10), v / (np.sqrt((v * v).sum()) + 1e-10)
            want[n] += ((u - v) ** 2).sum() / (fa.shape[2] * fa.shape[3])
    assert got.numpy() == pytest.approx(want, rel=1e-10)
    assert perceptual_distance(c, a, a).abs().max() == 0 and (got > 0).all()


def test_ppl_of_the_identity_map_on_a_sphere_is_the_squared_arc_speed():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(4, 2, 5, generator=g, dtype=torch.float64) for _ in range(2))
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))[:, None, None]  # equal norms: an arc of radius |a|
    t = torch.tensor([0.0, 0.3, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(slerp(a, b, torch.zeros(4)), a.flatten(1)) and torch.allclose(slerp(a, b, torch.ones(4)),
                                                                                       b.flatten(1))
    r = a.flatten(1).norm(dim=1)
    omega = torch.arccos((a.flatten(1) * b.flatten(1)).sum(1) / r ** 2)
    lengths = path_lengths(lambda z: z, a, b, t, lambda x, y: (x - y).pow(2).flatten(1).sum(1))
    assert torch.allclose(lengths, (r * omega) ** 2, rtol=1e-6)
    assert torch.allclose(slerp(a, b, t).norm(dim=1), r)


def test_ppl_trimmed_mean_drops_what_lies_outside_the_1st_to_99th_percentile():
    v = torch.cat([torch.arange(1.0, 200.0), torch.tensor([1e6])])[torch.randperm(200)]  # one outlier
    assert trimmed_mean(v) == pytest.approx(sum(range(2, 200)) / 198)  # the two extremes dropped
    assert trimmed_mean(torch.tensor([3.0, 1.0, 1e6])) == pytest.approx((4 + 1e6) / 3)  # too few to trim
    assert trimmed_mean(torch.full((5,), 2.5)) == 2.5


def test_evaluate_real_digits_and_a_paired_copy(tmp_path):
    require("safetensors", "demo")
    from fastdiff.demo.data import load_split
    from fastdiff.evaluation import Samples, evaluate, load_reference

    x, labels = load_split("train")
    images = ((x[:100] + 1) * 127.5).round().to(torch.uint8)
    s = Samples(images, labels[:100])
    r = evaluate(s, load_reference("digits"), bootstrap=10, paired=Samples(images.clone(), labels[:100]),
                 is_splits=1)
    assert r["perceptual"] == 0 and r["perceptual_ci"] == [0, 0]
    assert 8 < r["is"] <= r["is_ci"][1] <= 10 and r["precision"] > 0.8 and r["recall"] > 0.5 and r["acc"] > 0.9
    for key in ("is", "precision", "recall", "acc"):
        assert r[f"{key}_ci"][0] <= r[key] <= r[f"{key}_ci"][1], key


def _table_without_timings(out):
    return [re.sub(r"^(\|[^|]*\|[^|]*\|)[^|]*", r"\1", line) for line in (out / "table.md").read_text().splitlines()]


def test_compare_under_torchrun_finishes_with_the_one_process_table(tmp_path):
    """Two gloo processes (the hang of issue 23: rank 0 in a metric's sync, rank 1 in generate's
    broadcast) against one process run here (one thread, like each rank): the same table but for
    the ms column. The reference images are random (the ranks need not load the digits data)."""
    require("safetensors", "demo")
    from fastdiff.cli import main

    reference = tmp_path / "ref.npz"
    np.savez(reference, images=np.random.default_rng(0).integers(0, 256, (8, 1, 16, 16), dtype=np.uint8))
    args = ["compare", "--configs", "ddim:1", "dpmpp_2m:2", "--num-images", "6", "--batch-size", "3", "--bootstrap",
            "3", "--perceptual-reference", "ddim:3", "--ppl-pairs", "2", "--reference", str(reference), "--device",
            "cpu", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastdiff", *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=150)
    assert two.returncode == 0, two.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    table = _table_without_timings(tmp_path / "two")
    assert table == _table_without_timings(tmp_path / "one")
    assert [line.split(" |")[0] for line in table if line.startswith("| ") and "|---" not in line][1:] == \
        ["| ddim:1", "| dpmpp_2m:2"]


def test_the_missing_weights_line_names_the_file_where_the_check_looks(tmp_path, monkeypatch):
    """fastdiff never downloads: the one line says what to put where, and putting it there is enough."""
    from huggingface_hub import constants

    from fastdiff import external_metrics

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(external_metrics, "_importable", lambda name: True)  # the packages, not the weights
    for features, name in (("inception", "weights-inception-2015-12-05-6726825d.pth"),
                           ("lpips", "alexnet-owt-7be5be79.pth")):
        path = tmp_path / "torch" / "hub" / "checkpoints" / name
        line = external_metrics.missing(features)
        assert f"saved as {path}" in line and "https://" in line and "\n" not in line
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        assert external_metrics.missing(features) is None
    line = external_metrics.missing("clip")
    assert f"Hugging Face cache {tmp_path / 'hf'}" in line and "never downloads" in line
    snapshot = tmp_path / "hf" / "models--openai--clip-vit-large-patch14"
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "config.json").write_text("{}")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc")
    assert external_metrics.missing("clip") is None


def test_clip_score_with_a_tiny_clip_in_the_cache(tmp_path, monkeypatch):
    """The weights-present path of --features clip, with a tiny random CLIP saved where `missing`
    looks (no network): 100 max(cos, 0), checked against CLIP's own logits / logit scale."""
    transformers = require("transformers", "diffusers")
    from huggingface_hub import constants

    from fastdiff import external_metrics

    snapshot = tmp_path / "hf" / "models--openai--clip-vit-large-patch14"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=8, max_position_embeddings=77, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)).eval()
    processor = transformers.CLIPProcessor(tokenizer=transformers.CLIPTokenizer(),
                                           image_processor=transformers.CLIPImageProcessor(
                                               size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    images = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8)
    labels = torch.randperm(10)
    captions = [f"a handwritten digit {k}" for k in labels.tolist()]
    rgb = torch.nn.functional.interpolate(images.float().expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear")
    inputs = processor(text=captions, images=list(rgb.clamp(0, 255).round().to(torch.uint8)), return_tensors="pt",
                       padding=True)
    scores = []
    for sign in (1, -1):  # the text projection negated flips every cosine: both sides of the clamp
        with torch.no_grad():
            model.text_projection.weight.mul_(sign)
            cos = model(**inputs).logits_per_image.diagonal().double() / model.logit_scale.exp().double()
        for part in (model, processor):
            part.save_pretrained(snapshot / "snapshots" / "abc")
        assert external_metrics.missing("clip") is None
        got = external_metrics.compute("clip", images, images, labels)["clip_score"]
        assert got == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4, abs=1e-9)
        scores.append(got)
    assert min(scores) == 0 < max(scores)


def test_evaluate_on_a_rank_other_than_0_checks_then_leaves_the_work_to_rank_0(tmp_path, monkeypatch, capsys):
    """Under torchrun `evaluate` enters no collective: rank 0 evaluates, the others only check."""
    require("sklearn", "demo")  # the digits reference
    from fastdiff.cli import main

    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((4, 1, 16, 16), np.uint8))
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", str(path), "--bootstrap", "2"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["evaluate", str(path), "--is-splits", "0"]) == 2  # but every rank checks

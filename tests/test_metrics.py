"""metrics.py against independent references: scipy's matrix square root (the pytorch-fid
formula), closed-form Fréchet distances between Gaussians, the entropy form of the Inception
Score, and known extreme cases; metric_nets.py's MNIST-family classifier on a separable toy.
Run: python -m pytest -q tests/test_metrics.py"""
import numpy as np
import pytest
import torch
from scipy import linalg, stats

import metric_nets
import metrics


def fid_scipy(feats_a, feats_b):
    """The reference FID of pytorch-fid / the TTUR code: sqrtm(C_a C_b) by scipy, with the usual
    eps fallback."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = mu_a - mu_b
    return diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean.real)


def correlated_features(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift + 0.1 * rng.normal(size=d)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = correlated_features(rng, 2000, 32)
    b = correlated_features(rng, 1500, 32, shift=0.3)
    expected = fid_scipy(a, b)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-9)
    # torch float32 inputs are computed in float64 too
    got32 = metrics.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got32 == pytest.approx(fid_scipy(a.astype(np.float32).astype(np.float64),
                                            b.astype(np.float32).astype(np.float64)), rel=1e-7)


def test_kernel_distance_matches_a_double_loop_and_is_unbiased():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 4)), rng.normal(0.5, 1.0, size=(9, 4))
    k = lambda x, y: (float(np.dot(x, y)) / 4 + 1) ** 3  # noqa: E731
    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    ab = sum(k(x, y) for x in a for y in b) / (7 * 9)
    assert metrics.kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)
    # Unbiased: two sets of 20 from one distribution average 0 (Monte Carlo over 400 pairs),
    # where FID of the same pairs is far from 0; a shifted pair is far from 0 too.
    same = [metrics.kernel_distance(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)))
            for _ in range(400)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    shifted = [metrics.kernel_distance(rng.normal(size=(20, 8)), rng.normal(1.0, 1, size=(20, 8)))
               for _ in range(50)]
    assert np.mean(shifted) > 10 * np.std(same) / np.sqrt(len(same))
    with pytest.raises(ValueError, match="KID needs two"):
        metrics.kernel_distance(a, b[:, :3])


def test_frechet_distance_of_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    a = correlated_features(rng, 500, 64)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    assert metrics.frechet_distance(a, a.copy()) >= -1e-9


def test_frechet_distance_gaussian_closed_forms():
    # Commuting covariances (diagonal in a shared rotated basis Q):
    # W2² = ‖μ_a − μ_b‖² + Σ_i (√a_i − √b_i)².
    rng = np.random.default_rng(2)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    var_a, var_b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    cov_a, cov_b = q @ np.diag(var_a) @ q.T, q @ np.diag(var_b) @ q.T
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = metrics.frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b)
    assert got == pytest.approx(closed, rel=1e-10)

    # Non-commuting 2×2: for a 2×2 PSD M, tr √M = √(tr M + 2 √det M), with M ~ C_a C_b.
    cov_a = np.array([[2.0, 0.8], [0.8, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 1.5]])
    det = np.linalg.det(cov_a) * np.linalg.det(cov_b)
    tr_sqrt = np.sqrt(np.trace(cov_a @ cov_b) + 2 * np.sqrt(det))
    closed = 1.0 + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    got = metrics.frechet_distance_from_moments([1.0, 0.0], cov_a, [0.0, 0.0], cov_b)
    assert got == pytest.approx(closed, rel=1e-12)

    # From samples: the Gaussian fits of large samples converge to the closed form.
    n = 200_000
    feats_a = rng.multivariate_normal([1.0, 0.0], cov_a, size=n)
    feats_b = rng.multivariate_normal([0.0, 0.0], cov_b, size=n)
    assert metrics.frechet_distance(feats_a, feats_b) == pytest.approx(closed, abs=0.02)


def test_frechet_terms_split_fid_into_its_mean_and_covariance_parts():
    # b = 2 a + 3 exactly: μ_b = 2 μ_a + 3 and C_b = 4 C_a, so the mean term is ‖μ_a + 3‖² and
    # the covariance term tr C_a + 4 tr C_a − 2 tr (4 C_a²)^{1/2} = tr C_a (float64 closed form)
    rng = np.random.default_rng(3)
    a = correlated_features(rng, 400, 16)
    b = 2 * a + 3
    mean, cov = metrics.frechet_terms(a, b)
    assert mean == pytest.approx(np.sum((a.mean(0) + 3) ** 2), rel=1e-10)
    assert cov == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-8)
    assert mean + cov == pytest.approx(metrics.frechet_distance(a, b), rel=1e-12)
    # a shifted copy: all mean term; a set spread less around the same mean: all covariance
    assert metrics.frechet_terms(a, a + 1)[1] == pytest.approx(0, abs=1e-8)
    shrunk = a.mean(0) + 0.5 * (a - a.mean(0))
    mean, cov = metrics.frechet_terms(shrunk, a)
    assert mean == pytest.approx(0, abs=1e-20) and cov == pytest.approx(
        0.25 * np.trace(np.cov(a, rowvar=False)), rel=1e-8)  # Σ (√a_i − √(a_i / 4))² = tr C / 4


@pytest.mark.parametrize("noise", [0.0, 1e-10])
def test_frechet_distance_near_singular_covariance(noise):
    # Features that live in a k-dim subspace of R^D (k < D and fewer samples than D): the
    # covariances are singular. FID is invariant under an isometric embedding, so the exact
    # answer is the FID of the k-dim coordinates, where everything is well conditioned.
    rng = np.random.default_rng(3)
    k, d, n = 5, 64, 40
    basis, _ = np.linalg.qr(rng.normal(size=(d, k)))  # (D, k), orthonormal columns
    low_a = correlated_features(rng, n, k)
    low_b = correlated_features(rng, n, k, shift=0.5)
    high_a = low_a @ basis.T + noise * rng.normal(size=(n, d))
    high_b = low_b @ basis.T + noise * rng.normal(size=(n, d))
    got = metrics.frechet_distance(high_a, high_b)
    assert np.isfinite(got)
    assert got == pytest.approx(fid_scipy(low_a, low_b), rel=1e-6, abs=1e-7)
    # identical singular sets: ≈ 0, not NaN and not a large negative number
    assert abs(metrics.frechet_distance(high_a, high_a)) < 1e-6


def inception_score_entropy_form(probs, splits):
    """IS = exp(H(p(y)) − E_x H(p(y|x))): the mutual-information form, via scipy.stats.entropy."""
    scores = []
    for part in np.array_split(probs, splits):
        mean_entropy = np.mean([stats.entropy(p) for p in part])
        scores.append(np.exp(stats.entropy(part.mean(0)) - mean_entropy))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_entropy_form():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(10, 0.3), size=1000)
    mean, std = metrics.inception_score(probs, splits=10, shuffle_seed=None)
    ref_mean, ref_std = inception_score_entropy_form(probs, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)


def test_inception_score_known_cases():
    k = 7
    uniform = np.full((700, k), 1.0 / k)
    assert metrics.inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = np.eye(k)[np.tile(np.arange(k), 100)]  # each split of 70 rows: every class 10 times
    mean, std = metrics.inception_score(torch.from_numpy(one_hot).float(), splits=10,
                                        shuffle_seed=None)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    one_class = np.eye(k)[np.zeros(700, dtype=int)]  # confident but never diverse
    assert metrics.inception_score(one_class, splits=10)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_does_not_depend_on_sample_order():
    """sample.py writes samples sorted by class: in that order every chunk holds one class and
    scores 1. The default fixed shuffle must give about K, as for well-mixed samples."""
    k, n = 10, 1000
    sorted_one_hot = torch.from_numpy(np.eye(k)[np.repeat(np.arange(k), n // k)])
    in_order = metrics.inception_score(sorted_one_hot, splits=10, shuffle_seed=None)[0]
    assert in_order == pytest.approx(1.0)
    mean, _ = metrics.inception_score(sorted_one_hot, splits=10)
    assert mean > 0.9 * k  # random chunks of 100 are nearly balanced: exp(H(p(y))) ≈ K
    reordered = sorted_one_hot[torch.randperm(n, generator=torch.Generator().manual_seed(5))]
    assert metrics.inception_score(reordered, splits=10)[0] == pytest.approx(mean, rel=0.05)


def test_classifier_shapes_and_outputs():
    torch.manual_seed(0)
    for in_channels, size in [(1, 28), (1, 8), (3, 32)]:
        clf = metric_nets.Classifier(in_channels=in_channels, image_size=size)
        images = torch.randint(0, 256, (5, in_channels, size, size), dtype=torch.uint8)
        assert clf(images.float() / 127.5 - 1).shape == (5, 10)
        feats, probs = metrics.classifier_outputs(clf, images, batch_size=2)
        assert feats.shape == (5, 128) and probs.shape == (5, 10)
        assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
        # floats in [-1, 1] are quantised to uint8 first: the same images give the same outputs
        x = images.float() / 127.5 - 1
        assert torch.allclose(metrics.classifier_probs(clf, x), probs, atol=1e-6)


def test_classifier_train_save_load_and_mnist_metrics(tmp_path):
    # A tiny smoke run on two separable synthetic "classes" (bright top half vs bright bottom half).
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randint(0, 60, (64, 1, 12, 12), generator=g).to(torch.uint8)
    images[labels == 0, :, :6] += 180
    images[labels == 1, :, 6:] += 180
    clf = metric_nets.train_classifier(images, labels, epochs=8, batch_size=16, lr=3e-3,
                                       max_shift=1, log=lambda s: None)
    assert metrics.accuracy(clf, images, labels) > 0.9
    path = tmp_path / "clf.pt"
    metric_nets.save_classifier(clf, str(path), dataset="toy", test_accuracy=1.0)
    torch.load(path, weights_only=True)  # plain tensors and values only
    loaded = metric_nets.load_classifier(str(path))
    probs = metrics.classifier_probs(clf, images)
    assert torch.equal(metrics.classifier_probs(loaded, images), probs)
    ref_feats = metrics.classifier_features(loaded, images)
    out = metrics.classifier_metrics(loaded, images, labels, ref_feats, splits=4)
    assert set(out) == {"fid", "is", "is_std", "accuracy"}
    assert abs(out["fid"]) < 1e-6 and out["accuracy"] > 0.9 and 1.0 <= out["is"] <= 2.0 + 1e-9
    with pytest.raises(metric_nets.CheckpointError, match="train-classifier"):
        metric_nets.load_classifier(str(tmp_path / "missing.pt"))


def test_missing_torch_fidelity_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)  # import: ImportError
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        metrics.cifar10_metrics(torch.zeros(10, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(SystemExit) as exit:
        metrics.main(["cifar10", "--npz", str(tmp_path / "samples.npz"), "--inception"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("metrics.py: ")
    assert "pip install torch-fidelity" in err


@pytest.mark.parametrize("argv, expected", [
    (["mnist", "--npz", "s.npz", "--holdout", "-1"], "--holdout: must be 0 or more, got -1"),
    (["train-classifier", "--epochs", "0"], "--epochs: must be positive, got 0"),
    (["train-classifier", "--lr", "nan"], "--lr: must be positive, got nan"),
    (["cifar10", "--npz", "s.npz", "--batch-size", "x"], "--batch-size: invalid int value: 'x'"),
    (["cifar10"], "required: --npz (see python metrics.py cifar10 --help)"),
    (["mnist", "--npz", "s.npz", "--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    (["mnist", "--npz", "s.npz", "--device", "cuda:99"], "--device cuda"),
    (["score"], "invalid choice: 'score'"),
])
def test_argument_errors_are_one_line_and_exit_code_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit:
        metrics.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("metrics.py: error: ") and err.count("\n") == 1 and expected in err, err


def test_load_samples_npz_reads_sample_py_layout(tmp_path):
    # sample.py --npz writes uint8 images as (N, H, W, C), with per-image labels and w
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(6, 4, 5, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    np.savez(path, images=images, labels=np.arange(6), w=np.array([0, 0, 0, 1, 1, 1.0]))
    x, labels, w = metrics.load_samples_npz(str(path))
    assert x.shape == (6, 3, 4, 5) and x.dtype == torch.uint8
    assert torch.equal(x[2, 1], torch.from_numpy(images[2, :, :, 1]))
    assert labels.tolist() == list(range(6)) and w.tolist() == [0, 0, 0, 1, 1, 1]


# --------------------------------------------------------------------------------------------
# Held-out splits and the memorisation check, against brute force
# --------------------------------------------------------------------------------------------

def test_split_holdout_keeps_the_last_images_of_each_class_out():
    import data
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    images = torch.arange(200, dtype=torch.uint8).reshape(200, 1, 1, 1)  # image i holds number i
    train_x, train_y, held_x, held_y = data.split_holdout(images, labels, 5)
    of_class = [[j for j in range(200) if labels[j] == c] for c in range(4)]
    expected_held = sorted(i for members in of_class for i in members[-5:])
    assert sorted(held_x.flatten().tolist()) == expected_held
    assert sorted(train_x.flatten().tolist()) == sorted(set(range(200)) - set(expected_held))
    assert torch.equal(held_y, labels[held_x.flatten().long()])
    assert torch.equal(train_y, labels[train_x.flatten().long()])
    assert data.split_holdout(images, labels, 0)[0].shape[0] == 200
    with pytest.raises(data.DataError, match="cannot hold out"):
        data.split_holdout(images, labels, 100)


def test_reference_and_floor_are_disjoint_halves():
    images, labels = torch.arange(11).reshape(11, 1, 1, 1), torch.arange(11) % 3
    (ref_x, ref_y), (floor_x, floor_y) = metrics.reference_and_floor(images, labels)
    assert ref_x.flatten().tolist() == [0, 2, 4, 6, 8, 10]
    assert floor_x.flatten().tolist() == [1, 3, 5, 7, 9]
    assert torch.equal(ref_y, labels[0::2]) and torch.equal(floor_y, labels[1::2])


def test_nearest_distances_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (7, 1, 4, 4), dtype=np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, (9, 1, 4, 4), dtype=np.uint8))
    xa, xb = (t.double().flatten(1).numpy() / 127.5 - 1 for t in (a, b))
    expected = [min(np.sqrt(((x - y) ** 2).sum()) for y in xb) for x in xa]
    got = metrics.nearest_distances(a, b, batch_size=3).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # float32 pixels
    assert metrics.nearest_distances(a, a).abs().max() < 1e-6  # every image is its own nearest


@pytest.mark.parametrize("name,dataset", [("fashion-mnist", "fashion-mnist"),
                                          ("mnist-4k", "mnist")])
def test_load_held_is_load_splits_held_part(name, dataset):
    from conftest import shared_data
    folder = shared_data(name)
    held, full = metrics.load_held(dataset, folder), metrics.load_splits(dataset, folder)["held"]
    assert all(torch.equal(a, b) for a, b in zip(held, full)) and len(held[1]) >= 1000

"""The functions behind the notebooks' sliders: each checked against an independent reference
(scipy's Gaussian densities for the toy, a judge the model never saw for the shipped models)."""
import matplotlib
import numpy as np
import pytest
import scipy.stats
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from conftest import judge  # noqa: E402

import explore  # noqa: E402
import toy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_windows(monkeypatch):
    monkeypatch.setattr(plt, "show", lambda: plt.close("all"))


def scipy_log_densities(points, logsnr):
    """(log p(z_λ | c) for c = 0, 1, 2 (3, G), log p(z_λ) (G,)) from scipy's normal densities."""
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
    per_class = np.zeros((3, len(points)))
    for c, weight, mean, cov in toy.COMPONENTS:
        per_class[c] += weight * scipy.stats.multivariate_normal(
            alpha * np.array(mean), alpha ** 2 * cov.numpy() + sigma ** 2 * np.eye(2)).pdf(points)
    return np.log(per_class), np.log(per_class.mean(0))


@pytest.mark.parametrize("w,logsnr,c", [(0.0, 1.0, 0), (2.0, -1.0, 1), (5.0, 3.0, 2)])
def test_toy_panel_draws_the_guided_density_and_the_implicit_classifier(w, logsnr, c):
    f = explore.toy_panel(w, logsnr, c)
    gx, gy = f["grid"]
    points = np.stack([gx.flatten().numpy(), gy.flatten().numpy()], 1)
    log_cond, log_marginal = scipy_log_densities(points, logsnr)
    for k in range(3):  # p(z|k) p(k|z)^w ∝ p(z|k)^(1+w) / p(z)^w, normalised on the grid
        expected = scipy.special.softmax((1 + w) * log_cond[k] - w * log_marginal)
        np.testing.assert_allclose(f["density"][k].flatten().numpy(), expected, rtol=1e-6,
                                   atol=1e-12)
    np.testing.assert_allclose(f["classifier"].flatten().numpy(),
                               np.exp(log_cond[c] - log_marginal) / 3, rtol=1e-8)
    cx, cy = f["coarse"]  # the arrows: ∇ log p(c | z) by central differences of scipy's
    coarse, h = np.stack([cx.flatten().numpy(), cy.flatten().numpy()], 1), 1e-5
    for axis in range(2):
        step = np.eye(2)[axis] * h
        up, down = (scipy_log_densities(coarse + s, logsnr) for s in (step, -step))
        diff = ((up[0][c] - up[1]) - (down[0][c] - down[1])) / (2 * h)
        np.testing.assert_allclose(f["field"][:, axis].numpy(), diff, rtol=1e-4, atol=1e-6)


def test_digits_panel_samples_the_asked_digit_more_often_as_w_grows():
    hits = {w: (judge("digits")(explore.digits_panel(w, c=3, n=16)) == 3).double().mean()
            for w in (-1.0, 3.0)}
    assert hits[3.0] >= 0.8 and hits[-1.0] <= 0.5, hits


def test_cifar_panel_samples_each_class_and_guidance_raises_accuracy():
    labels = torch.arange(10).repeat_interleave(2)
    hits = {w: (judge("cifar10")(explore.cifar_panel(w)) == labels).double().mean()
            for w in (-1.0, 4.0)}
    assert hits[4.0] >= 0.5 and hits[4.0] >= hits[-1.0] + 0.2, hits


def test_path_predictions_end_at_the_sample_and_agree_where_w_is_0():
    model, _ = explore.shipped("mnist-4k")
    labels = torch.tensor([1, 8])
    x, record = explore.path_predictions(model, labels, 3.0, steps=12, every=2)
    lams = [r[0] for r in record]
    assert len(lams) == 5 and lams[0] >= -10 and lams[-1] == pytest.approx(20)
    assert torch.allclose(record[-1][3], x, atol=1e-5)  # the last x̂ of ε̃ is the sample
    _, plain = explore.path_predictions(model, labels, 0.0, steps=12, every=2)
    for _, cond, _, guided in plain:  # w = 0: ε̃ is ε(z, c)
        assert torch.allclose(cond, guided, atol=1e-6)
    assert not torch.equal(record[1][1], record[1][2])  # ε(z, c) and ε(z, ∅) differ


def test_slider_builds_one_control_per_argument_at_the_panel_s_defaults():
    widget = explore.slider(explore.digits_panel, w=(-1.0, 6.0, 0.5), c=(0, 9, 1))
    controls = {child.description: child.value for child in widget.children[:2]}
    assert controls == {"w": 0.0, "c": 3}  # digits_panel(w=0.0, c=3)
    widget = explore.slider(explore.toy_panel, w=(2.0, 6.0, 0.5), logsnr=(-6.0, 6.0, 0.5))
    assert [child.value for child in widget.children[:2]] == [2.0, 0.0]  # w = 1 clamped to 2


def test_live_study_scores_the_shipped_model_as_guidance_grows(capsys):
    """Without data: accuracy and IS by the shipped classifier; the unconditional end (w = −1) is
    near chance, w = 3 near certain, and the table is printed."""
    results = explore.live_study("mnist-4k", ws=(-1.0, 3.0), per_class=3)
    assert results[3.0]["accuracy"] >= 0.8 and results[-1.0]["accuracy"] <= 0.5, results
    assert all(1 <= r["is"] <= 10 and "kid" not in r for r in results.values())
    out = capsys.readouterr().out
    assert "KID left out" in out and "checkpoints/scores/mnist-4k.json" in out  # full scores beside
    assert "274.16" in out and "130.96" not in out  # the 1,000-per-w FID at w = 3, not at w = 1


@pytest.mark.slow
def test_live_study_with_data_adds_kid_and_the_floor():
    # KID is unbiased: real held-out images score about 0 at 100 samples, w = 3's narrow digits far
    # more (mnist-4k's FID at 1,000: 274 against the floor's 27).
    from conftest import shared_data
    data_dir = shared_data("mnist-4k")
    results = explore.live_study("mnist-4k", ws=(3.0,), per_class=10, data_dir=data_dir)
    floor, sampled = results["floor"], results[3.0]
    assert abs(floor["kid"]) < floor["kid_std"] < 0.2 * sampled["kid"], results
    assert floor["accuracy"] >= 0.9, results

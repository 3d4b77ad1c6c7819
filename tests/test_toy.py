"""The exact toy (toy.py) against independent references, and what it shows about the rules:
CFG and DDIM settle as the number of steps T grows, CFG++ does not."""
import numpy as np
import pytest
import torch

import guidance as G
import sample as sample_lib
import toy

pytestmark = pytest.mark.usefixtures("one_thread")


def class_moments(c):
    """Mean and covariance of p(x | c) from its components (law of total variance), float64."""
    parts = [(w, torch.tensor(m, dtype=torch.float64), S) for k, w, m, S in toy.COMPONENTS
             if k == c]
    mean = sum(w * m for w, m, _ in parts)
    cov = sum(w * (S + torch.outer(m - mean, m - mean)) for w, m, S in parts)
    return mean, cov


def frechet(x, mean, cov):
    """Fréchet distance between the Gaussian fit of samples x (N, 2) and N(mean, cov), by scipy."""
    import scipy.linalg
    m, s = x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(s @ cov.numpy()).real
    return float(((m - mean.numpy()) ** 2).sum() + np.trace(s + cov.numpy() - 2 * root))


def test_eps_exact_is_the_scaled_score_and_the_data_have_their_moments():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)  # the three classes and ∅
    z = torch.randn(200, 2, generator=g, dtype=torch.float64) * 2
    for lam in (-4.0, 0.0, 3.0):
        logsnr = torch.full((200,), lam, dtype=torch.float64)
        zg = z.clone().requires_grad_(True)
        score, = torch.autograd.grad(toy.log_p(zg, logsnr, labels).sum(), zg)
        sigma = torch.sigmoid(-logsnr).sqrt()[:, None]
        assert torch.allclose(toy.eps_exact(z, logsnr, labels), -sigma * score, atol=1e-12)
    for c in range(3):
        x = toy.sample_data(torch.full((100_000,), c), torch.Generator().manual_seed(c))
        mean, cov = class_moments(c)
        assert torch.allclose(x.mean(0), mean, atol=0.01)
        assert torch.allclose(torch.cov(x.T), cov, atol=0.015)


def distances(w, steps, guidance, n=500):
    """Fréchet distance to p(x | c), per class, of toy samples by the DDIM step at T = steps."""
    labels = torch.arange(3).repeat_interleave(n)
    x = sample_lib.sample(toy.ExactEps(), labels, w, steps, "ddim", clip_x=False, shape=(2,),
                          guidance=guidance, generator=torch.Generator().manual_seed(0))
    return [frechet(x[labels == c], *class_moments(c)) for c in range(3)]


@pytest.mark.parametrize("w", [0.0, -0.5])
def test_cfgpp_drifts_from_the_data_as_steps_grow_while_ddim_settles(w):
    """At the same w (γ = 1 + w), CFG++ moves further from p(x | c) at every T from 10 to 256;
    DDIM with CFG's ε̃ at w = 0 (the conditional model) comes closer. CFG++'s step is DDIM's
    plus σ_λ′ γ (ε(z, ∅) − ε(z, c)), a change that does not shrink with the step."""
    cfgpp = [max(distances(w, T, G.cfgpp_eps)) for T in (10, 50, 256)]
    ddim = [max(distances(0.0, T, G.guided_eps)) for T in (10, 50, 256)]
    assert cfgpp[0] < cfgpp[1] < cfgpp[2] and cfgpp[2] > 10 * cfgpp[0], cfgpp
    assert ddim[0] > 5 * max(ddim[1:]) and ddim[2] < 0.005, ddim  # 500 a class: floor ~0.001


def test_cfg_with_ddim_settles_as_steps_grow():
    """Guided (w = 2) DDIM has a limit as T grows: T = 128 and 256 nearly agree, T = 10 does
    not (its distance to the data differs from T = 256's ten times more)."""
    far = {T: np.array(distances(2.0, T, G.guided_eps)) for T in (10, 128, 256)}
    assert (abs(far[128] - far[256]) < 0.1 * abs(far[10] - far[256])).all(), far


def test_sample_py_runs_cfgpp_at_its_own_steps_unless_told(tmp_path):
    """The command line cannot silently give the large-T regime: --guidance cfgpp takes
    sample.RULE_STEPS (its paper's 50) whatever the sampler's default; --steps overrides it."""
    import json

    def steps_of(*extra):
        out = tmp_path / "run.json"
        sample_lib.main(["--ckpt", "digits", "--w", "-0.5", "--classes", "0", "--n-per-class",
                         "1", "--out", str(tmp_path / "g.png"), "--json", str(out), *extra])
        return json.loads(out.read_text())["steps"]

    assert steps_of("--guidance", "cfgpp", "--sampler", "ddim") == 50
    assert steps_of("--guidance", "cfgpp", "--sampler", "ddim", "--steps", "7") == 7
    assert steps_of("--sampler", "ddim") == sample_lib.SAMPLERS["ddim"]["steps"]  # cfg: 256


# ---------------- the measures of notebook 07

def test_blurred_eps_is_the_scaled_score_of_the_blurred_data():
    """ExactEps(blur=b) against autograd of the log density of x + b n, written out directly:
    a mixture of N(α m_k, α² (S_k + b² I) + σ² I)."""
    g = torch.Generator().manual_seed(1)
    z, labels = torch.randn(60, 2, generator=g, dtype=torch.float64), torch.arange(4).repeat(15)
    logsnr = torch.full((60,), 0.5, dtype=torch.float64)
    alpha, sigma = torch.sigmoid(logsnr).sqrt()[0], torch.sigmoid(-logsnr).sqrt()[0]
    zg, eye = z.clone().requires_grad_(True), torch.eye(2, dtype=torch.float64)
    dens = 0
    for k, pi, m, S in toy.COMPONENTS:
        cov = alpha ** 2 * (S + 0.6 ** 2 * eye) + sigma ** 2 * eye
        mean = alpha * torch.tensor(m, dtype=torch.float64)
        normal = torch.distributions.MultivariateNormal(mean, cov)
        weight = torch.where(labels == 3, pi / 3, torch.where(labels == k, pi, 0.0))
        dens = dens + weight * normal.log_prob(zg).exp()
    score, = torch.autograd.grad(dens.log().sum(), zg)
    got = toy.ExactEps(blur=0.6)(z, logsnr, labels)
    assert torch.allclose(got, -sigma * score, atol=1e-10)


@pytest.mark.parametrize("base", ["uncond", "cond"])
def test_classifier_guidance_with_the_exact_classifier_is_cfg(base):
    """Bayes: −σ ∇ log p(c | z_λ) = ε*(z, c) − ε*(z), so both forms of classifier guidance with
    the exact classifier (by autograd) are CFG's ε̃ with the exact ε (in closed form)."""
    g = torch.Generator().manual_seed(2)
    z, labels = torch.randn(30, 2, generator=g, dtype=torch.float64), torch.arange(3).repeat(10)
    logsnr, w = torch.linspace(-5, 5, 30, dtype=torch.float64), 2.5
    got = G.classifier_guided_eps(toy.ExactEps(), z, logsnr, labels, w,
                                  classifier=toy.ExactClassifier(), base=base)
    assert torch.allclose(got, G.guided_eps(toy.ExactEps(), z, logsnr, labels, w), atol=1e-10)
    gft = G.guidance_free_eps(toy.ExactGuidanceFree(), z, logsnr, labels, w)
    assert torch.allclose(gft, G.guided_eps(toy.ExactEps(), z, logsnr, labels, w), atol=1e-12)


def test_mmd2_against_a_double_loop_and_unbiased():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g,
                                                                         dtype=torch.float64)
    k = lambda x, y: sum(np.exp(-np.sum((x - y) ** 2) / (2 * h ** 2))  # noqa: E731
                         for h in toy.MMD_BANDWIDTHS)
    an, bn = a.numpy(), b.numpy()
    aa = sum(k(an[i], an[j]) for i in range(6) for j in range(6) if i != j) / 30
    bb = sum(k(bn[i], bn[j]) for i in range(8) for j in range(8) if i != j) / 56
    ab = sum(k(x, y) for x in an for y in bn) / 48
    assert toy.mmd2(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)
    same = [toy.mmd2(toy.sample_data(torch.zeros(40, dtype=torch.long), g),
                     toy.sample_data(torch.zeros(40, dtype=torch.long), g)) for _ in range(300)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(300)


def test_tilted_draws_have_the_importance_weighted_moments():
    """E over p(x | c) p(c | x)^w of x, x², by importance weights p(c | x)^w on exact draws of
    p(x | c) (no grid), against sample_tilted's grid draws; w = 0 is p(x | c) itself."""
    for c, w in [(1, 0.0), (1, 2.0), (2, 4.0)]:
        labels = torch.full((200_000,), c)
        x = toy.sample_data(labels, torch.Generator().manual_seed(4))
        log_pc = toy.log_class_densities(x)
        weight = torch.softmax(w * (log_pc[:, c] - torch.logsumexp(log_pc, 1)), 0)[:, None]
        mean, second = (weight * x).sum(0), (weight * x ** 2).sum(0)
        t = toy.sample_tilted(labels[:50_000], w, torch.Generator().manual_seed(5))
        assert torch.allclose(t.mean(0), mean, atol=0.015), (c, w)
        assert torch.allclose((t ** 2).mean(0), second, atol=0.03), (c, w)
    y = toy.sample_data(torch.arange(3).repeat_interleave(3000), torch.Generator().manual_seed(6))
    shares = toy.mode_shares(y, torch.arange(3).repeat_interleave(3000))
    assert set(shares) == {1, 2, 3, 4} and abs(sum(shares.values()) - 2) < 1e-12


def test_class_densities_bayes_accuracy_and_mode_shares_against_scipy():
    """log p(x | c) at the data from scipy's normal densities of toy.COMPONENTS; the Bayes class
    and each class's best-explaining component by argmax over them."""
    from scipy.stats import multivariate_normal
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(3).repeat_interleave(400)
    x = toy.sample_data(labels, g) + 0.3 * torch.randn(1200, 2, generator=g, dtype=torch.float64)
    comp = np.stack([pi * multivariate_normal(m, S.numpy()).pdf(x.numpy())
                     for _, pi, m, S in toy.COMPONENTS], axis=1)  # (N, M) π_ck N(x; m_k, S_k)
    owner = np.array([c for c, _, _, _ in toy.COMPONENTS])
    dens = np.stack([comp[:, owner == c].sum(1) for c in range(3)], axis=1)
    np.testing.assert_allclose(toy.log_class_densities(x).numpy(), np.log(dens), rtol=1e-10)
    y = labels.numpy()
    assert toy.bayes_accuracy(x, labels) == pytest.approx((dens.argmax(1) == y).mean(), abs=1e-12)
    best = np.where(owner[None, :] == y[:, None], comp, -1).argmax(1)
    for k, share in toy.mode_shares(x, labels).items():
        assert share == pytest.approx((best[y == owner[k]] == k).mean(), abs=1e-12), k

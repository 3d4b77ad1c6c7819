"""schedule.py against independent references: closed forms in float64, scipy's hyperbolic-secant
law, brute-force Gaussian conditioning with explicit matrix algebra, and Monte Carlo regression."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

import schedule as S


def sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_alpha_sigma_identities_float64():
    logsnr = torch.linspace(-20, 20, 401, dtype=torch.float64)
    alpha, sigma = S.alpha_sigma(logsnr)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), atol=1e-15)
    assert torch.allclose(torch.log(alpha ** 2 / sigma ** 2), logsnr, atol=1e-9)


@pytest.mark.parametrize("logsnr", [-20.0, -15.0, -1e-3, 0.0, 7.5, 20.0])
def test_alpha_sigma_float32_accurate_at_extremes(logsnr):
    alpha, sigma = S.alpha_sigma(torch.tensor(logsnr, dtype=torch.float32))
    ref_alpha = math.sqrt(sigmoid64(logsnr))
    ref_sigma = math.sqrt(sigmoid64(-logsnr))
    assert torch.isfinite(alpha) and torch.isfinite(sigma) and alpha > 0 and sigma > 0
    assert abs(alpha.item() - ref_alpha) <= 1e-6 * ref_alpha
    assert abs(sigma.item() - ref_sigma) <= 1e-6 * ref_sigma


def test_cosine_endpoints_and_inverse():
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ends = torch.tensor([S.LOGSNR_MAX, S.LOGSNR_MIN], dtype=torch.float64)
    assert torch.allclose(S.logsnr_cosine(u), ends)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(S.logsnr_cosine_inverse(S.logsnr_cosine(u)), u, atol=1e-12)
    # Other bounds, and float32 stays finite over the whole range.
    lam = S.logsnr_cosine(u, -10.0, 5.0)
    assert lam.min() >= -10.0 - 1e-9 and lam.max() <= 5.0 + 1e-9
    assert torch.allclose(S.logsnr_cosine_inverse(lam, -10.0, 5.0), u, atol=1e-12)
    lam32 = S.logsnr_cosine(torch.linspace(0, 1, 10001))
    assert torch.isfinite(lam32).all() and (lam32[1:] < lam32[:-1]).all()


def test_cosine_follows_truncated_hyperbolic_secant():
    """λ/2 has density ∝ sech on [λ_min/2, λ_max/2]: scipy's hypsecant, truncated."""
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = S.logsnr_cosine(u).numpy()
    H = scipy.stats.hypsecant.cdf
    lo, hi = H(S.LOGSNR_MIN / 2), H(S.LOGSNR_MAX / 2)
    result = scipy.stats.kstest(lam, lambda x: (H(x / 2) - lo) / (hi - lo))
    assert result.statistic < 1.63 / math.sqrt(len(lam))  # the 1% critical value
    # A uniform λ is clearly a different law (the test can fail).
    assert scipy.stats.kstest(S.logsnr_uniform(u).numpy(),
                              lambda x: (H(x / 2) - lo) / (hi - lo)).statistic > 0.1


def test_uniform_schedule():
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = S.logsnr_uniform(u)
    assert S.logsnr_uniform(0.0).item() == S.LOGSNR_MAX
    assert S.logsnr_uniform(1.0).item() == S.LOGSNR_MIN
    ks = scipy.stats.kstest(lam.numpy(), scipy.stats.uniform(-20, 40).cdf).statistic
    assert ks < 1.63 / math.sqrt(len(lam))  # the 1% critical value
    assert torch.allclose(S.logsnr_uniform_inverse(lam), u, atol=1e-12)


def test_q_sample_and_predict_x_broadcast_over_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    logsnr = torch.tensor([-20.0, -3.0, 0.5, 20.0], dtype=torch.float64)
    z = S.q_sample(x, logsnr, eps)
    a = np.sqrt(sigmoid64(logsnr.numpy()))[:, None, None, None]
    s = np.sqrt(sigmoid64(-logsnr.numpy()))[:, None, None, None]
    assert np.allclose(z.numpy(), a * x.numpy() + s * eps.numpy(), atol=1e-14)
    assert torch.allclose(S.predict_x(z, eps, logsnr), x, atol=1e-9)
    assert torch.allclose(S.predict_eps(z, x, logsnr), eps, atol=1e-9)


def brute_force_posterior(x, lam, lam_next):
    """Mean map and variance of z_λ′ | z_λ, x by conditioning the joint Gaussian of (z_λ′, z_λ)
    built from q(z_λ′|x) and q(z_λ|z_λ′), with explicit matrices, in float64 (D = len(x))."""
    D = len(x)
    a, s2 = math.sqrt(sigmoid64(lam)), sigmoid64(-lam)
    a_n, s2_n = math.sqrt(sigmoid64(lam_next)), sigmoid64(-lam_next)
    A = (a / a_n) * np.eye(D)  # z_λ = A z_λ′ + noise
    trans_var = (1 - math.exp(lam - lam_next)) * s2 * np.eye(D)  # σ²_{λ|λ′}
    cov_nn = s2_n * np.eye(D)  # Var z_λ′
    cov_zn = A @ cov_nn  # Cov(z_λ, z_λ′)
    cov_zz = A @ cov_nn @ A.T + trans_var  # Var z_λ
    joint = np.block([[cov_nn, cov_zn.T], [cov_zn, cov_zz]])
    mean_n, mean_z = a_n * x, A @ (a_n * x)
    # Condition the first block on the second: gain = Σ_12 Σ_22^{-1}.
    gain = np.linalg.solve(joint[D:, D:], joint[D:, :D]).T
    cond_cov = joint[:D, :D] - gain @ joint[D:, :D]
    return (lambda z: mean_n + gain @ (z - mean_z)), cond_cov


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_q_posterior_equals_gaussian_conditioning(dtype, tol):
    rng = np.random.default_rng(4)
    for _ in range(200):
        lam, lam_next = np.sort(rng.uniform(-20, 20, size=2))
        if rng.random() < 0.2:  # also nearly equal λ, where 1 − e^{λ−λ′} needs expm1
            lam_next = lam + 10 ** rng.uniform(-4, -1)
        x = rng.normal(size=3)
        z = rng.normal(size=3) * 2
        # The reference sees the inputs exactly as the tested dtype stores them.
        lam, lam_next, x, z = (torch.tensor(a, dtype=dtype).double().numpy()
                               for a in (lam, lam_next, x, z))
        mean_fn, cov = brute_force_posterior(x, float(lam), float(lam_next))
        mean, var = S.q_posterior(*(torch.tensor(a, dtype=dtype) for a in (z, x, lam, lam_next)))
        ref_mean, ref_var = mean_fn(z), cov[0, 0]
        assert np.allclose(cov, ref_var * np.eye(3), atol=1e-12)  # isotropic
        atol = tol * (1 + np.abs(ref_mean).max())
        assert np.allclose(mean.numpy(), ref_mean, rtol=tol, atol=atol)
        assert abs(var.item() - ref_var) <= tol * ref_var + 1e-30


def test_q_posterior_batched_logsnr_matches_per_example():
    g = torch.Generator().manual_seed(5)
    z, x = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    lam = torch.tensor([-10.0, 0.0, 3.0])
    lam_next = torch.tensor([-9.0, 2.0, 19.0])
    mean, var = S.q_posterior(z, x, lam, lam_next)
    for i in range(3):
        m_i, v_i = S.q_posterior(z[i], x[i], lam[i].item(), lam_next[i].item())
        assert torch.allclose(mean[i], m_i, atol=1e-6)
        assert torch.allclose(var[i].flatten(), v_i.flatten())


@pytest.mark.parametrize("lam,lam_next", [(-2.0, 1.0), (0.5, 0.9), (-8.0, -5.0)])
def test_q_posterior_monte_carlo_regression(lam, lam_next):
    """Draw z_λ′ ~ q(z_λ′|x), z_λ ~ q(z_λ|z_λ′); regress z_λ′ on z_λ for a fixed x."""
    n, x = 400_000, 0.7
    g = torch.Generator().manual_seed(6)
    a, s = (v.item() for v in S.alpha_sigma(torch.tensor(lam, dtype=torch.float64)))
    a_n, s_n = (v.item() for v in S.alpha_sigma(torch.tensor(lam_next, dtype=torch.float64)))
    z_next = a_n * x + s_n * torch.randn(n, generator=g, dtype=torch.float64)
    trans_std = math.sqrt((1 - math.exp(lam - lam_next)) * s ** 2)
    z = (a / a_n) * z_next + trans_std * torch.randn(n, generator=g, dtype=torch.float64)
    slope, intercept = np.polyfit(z.numpy(), z_next.numpy(), 1)
    resid_var = (z_next - (slope * z + intercept)).var().item()
    # q_posterior's mean is affine in z: read off its slope and intercept.
    x64 = torch.tensor(x, dtype=torch.float64)
    m0, var = S.q_posterior(torch.tensor(0.0, dtype=torch.float64), x64, lam, lam_next)
    m1, _ = S.q_posterior(torch.tensor(1.0, dtype=torch.float64), x64, lam, lam_next)
    se_slope = math.sqrt(var.item() / (n * z.var().item()))
    assert abs(slope - (m1 - m0).item()) < 5 * se_slope
    at_mean = intercept + slope * z.mean().item()  # the fit and q_posterior at the mean z
    assert abs(at_mean - (m0 + (m1 - m0) * z.mean()).item()) < 5 * math.sqrt(var.item() / n)
    assert abs(resid_var / var.item() - 1) < 5 * math.sqrt(2 / n)


def test_reverse_variance_endpoints_and_blend():
    rng = np.random.default_rng(7)
    lam, lam_next = np.sort(rng.uniform(-20, 20, size=(2, 500)), axis=0)
    one_minus_r = -np.expm1(lam - lam_next)
    tilde = one_minus_r * sigmoid64(-lam_next)  # σ̃²_{λ′|λ}
    forward = one_minus_r * sigmoid64(-lam)  # σ²_{λ|λ′}
    lam, lam_next = torch.tensor(lam), torch.tensor(lam_next)  # float64
    assert np.allclose(S.reverse_variance(lam, lam_next, 0.0).numpy(), tilde, rtol=1e-12)
    assert np.allclose(S.reverse_variance(lam, lam_next, 1.0).numpy(), forward, rtol=1e-12)
    for v in (0.2, 0.3, 0.7):
        ref = tilde ** (1 - v) * forward ** v
        assert np.allclose(S.reverse_variance(lam, lam_next, v).numpy(), ref, rtol=1e-10)
    # float32 stays finite and positive at the extremes.
    var32 = S.reverse_variance(torch.tensor(-20.0), torch.tensor(20.0), 0.3)
    assert torch.isfinite(var32) and var32 > 0

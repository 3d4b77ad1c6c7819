"""sample.py against independent references, never against its own recorded output.

Gaussian toys with exact ε*, references in float64 numpy/scipy from PAPER.md's formulas:
the exact law of Algorithm 2's chain at small T, the data distribution at large T, and with
guidance the T → ∞ limits (reverse SDE, probability-flow ODE, per sample by solve_ivp).
DPM-Solver++(2M)'s order. Seeds, clipping, dynamic thresholding against numpy's percentile;
the command line (bad inputs, PNG, npz, JSON). How the loop calls a rule: test_guidance.py.
"""
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_exit_2
from matplotlib.image import imread
from scipy.integrate import solve_ivp

import guidance as G
import model as M
import sample as SM
import schedule as S

REPO = os.path.dirname(os.path.abspath(SM.__file__))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses on the shared machine
# The digits preset's network (8×8, one channel), written out: the tests use random weights.
DIGITS = M.UNetConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(4,), dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed, **change):
    """The digits network (or a changed copy): random weights, zero-initialised layers too."""
    torch.manual_seed(seed)
    net = M.UNet(dataclasses.replace(DIGITS, **change)).eval().requires_grad_(False)
    for p in net.parameters():
        if not p.any():
            p.normal_(0, 0.1)
    return net


def draw(model, labels, w, seed=0, **kw):
    """sample() with a fresh generator seeded `seed` (its first draw is z_1)."""
    return SM.sample(model, labels, w, generator=torch.Generator().manual_seed(seed), **kw)


def close(a, b, tol=1e-10):
    """a (tensor or array) equals the numpy reference b to tol, relative to b's scale."""
    a = a.numpy() if torch.is_tensor(a) else a
    assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), np.abs(a - b).max()


# ---------------- Gaussian toys with exact ε*

class MixtureEps(torch.nn.Module):
    """Exact ε* for x | c ~ N(m_c, Σ) (shared Σ, equal priors); ∅ gets the mixture's ε*:
    z_λ | c ~ N(α m_c, Σ_λ), Σ_λ = α² Σ + σ² I, so ε*(z, c) = σ Σ_λ⁻¹ (z − α m_c), and
    ε*(z) = σ Σ_λ⁻¹ (z − α E[m_c | z_λ]) (Bayes: a softmax). Float64, in Σ's eigenbasis."""

    def __init__(self, means, cov):
        super().__init__()
        self.eigval, self.Q = torch.linalg.eigh(torch.tensor(cov, dtype=torch.float64))
        self.means = torch.tensor(means, dtype=torch.float64) @ self.Q  # (K, D), eigenbasis
        self.null_label = len(means)

    def forward(self, z, logsnr, labels):
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64).expand(len(z))[:, None]  # (B, 1)
        alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
        y = z.double() @ self.Q  # (B, D)
        var = alpha ** 2 * self.eigval + sigma ** 2  # diagonal of Σ_λ, (B, D)
        dist2 = (y[:, None] - alpha[:, None] * self.means) ** 2 / var[:, None]  # (B, K, D)
        mean_mix = torch.softmax(-0.5 * dist2.sum(-1), dim=1) @ self.means
        is_null = (labels == self.null_label)[:, None]
        mean = torch.where(is_null, mean_mix, self.means[labels.clamp(max=len(self.means) - 1)])
        return (sigma * (y - alpha * mean) / var @ self.Q.T).to(z.dtype)


class PerLabelGaussianEps(torch.nn.Module):
    """Exact ε* when each label (∅ last) has its own 1-D Gaussian x | l ~ N(m_l, s_l²):
    ε*(z, l) = σ (z − α m_l) / (α² s_l² + σ²). With guidance ε̃ is then linear in z."""

    def __init__(self, means, variances):
        super().__init__()
        self.m = torch.tensor(means, dtype=torch.float64)
        self.s2 = torch.tensor(variances, dtype=torch.float64)
        self.null_label = len(means) - 1

    def forward(self, z, logsnr, labels):
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64).expand(len(z))[:, None]  # (B, 1)
        alpha2, sigma2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)
        m, s2 = self.m[labels][:, None], self.s2[labels][:, None]
        eps = sigma2.sqrt() * (z.double() - alpha2.sqrt() * m) / (alpha2 * s2 + sigma2)
        return eps.to(z.dtype)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logsnr_grid(T):
    """λ_1 = λ_min < … < λ_T = λ_max: −2 log tan(a u + b) at evenly spaced u from 1 to 0."""
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    return -2 * np.log(np.tan(a * np.linspace(1, 0, T) + b))


def linear_guided_eps(logsnr, w, m_c, s2_c, m_u, s2_u):
    """ε̃ = (1 + w) ε*(z, c) − w ε*(z, ∅) = σ (k z − c) for the per-label toy: k, c, α, σ."""
    alpha2, sigma2 = sigmoid(logsnr), sigmoid(-logsnr)
    p_c, p_u = alpha2 * s2_c + sigma2, alpha2 * s2_u + sigma2
    k = (1 + w) / p_c - w / p_u
    c = math.sqrt(alpha2) * ((1 + w) * m_c / p_c - w * m_u / p_u)
    return k, c, math.sqrt(alpha2), math.sqrt(sigma2)


def chain_law(T, sampler, v, w, toy):
    """Mean and variance of Algorithm 2's (or DDIM's) output, exactly: each step is affine
    in z plus Gaussian noise, so z ~ N(M, V) throughout."""
    logsnr, M_, V = logsnr_grid(T), 0.0, 1.0  # z_1 ~ N(0, 1)
    for t in range(T):
        k, c, alpha, sigma = linear_guided_eps(logsnr[t], w, *toy)
        x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # x̃ = x_k z + x_c
        if t == T - 1:
            return x_k * M_ + x_c, x_k ** 2 * V
        alpha_n, sigma_n = math.sqrt(sigmoid(logsnr[t + 1])), math.sqrt(sigmoid(-logsnr[t + 1]))
        if sampler == "ddim":  # z' = α' x̃ + σ' (z − α x̃)/σ
            z_k = alpha_n * x_k + sigma_n * (1 - alpha * x_k) / sigma
            z_c, var = (alpha_n - sigma_n * alpha / sigma) * x_c, 0.0
        else:  # z' = e^{λ−λ'} (α'/α) z + (1 − e^{λ−λ'}) α' x̃ + noise, (σ̃²)^{1−v} (σ²_{λ|λ'})^v
            r = math.exp(logsnr[t] - logsnr[t + 1])
            z_k, z_c = r * alpha_n / alpha + (1 - r) * alpha_n * x_k, (1 - r) * alpha_n * x_c
            var = ((1 - r) * sigma_n ** 2) ** (1 - v) * ((1 - r) * sigma ** 2) ** v
        M_, V = z_k * M_ + z_c, z_k ** 2 * V + var


def sde2m_chain_law(T, w, toy, second_order=True):
    """SDE-DPM-Solver++(2M)'s exact output law from Lu et al.'s update (k-diffusion's, η = 1)
    in y = z/α, σ̂ = σ/α: y′ = (σ̂′/σ̂) e^{−h} y + (1 − e^{−2h}) [x̃ + (x̃ − x̃_prev)/(2r)] +
    σ̂′ (1 − e^{−2h})^{1/2} n, h = (λ′ − λ)/2, r = h_prev/h; affine in s = (z, x̃_prev)."""
    logsnr = np.linspace(S.LOGSNR_MIN, S.LOGSNR_MAX, T)
    M_, V = np.zeros(2), np.diag([1.0, 0.0])  # z_1 ~ N(0, 1); no x̃_prev yet
    for t in range(T):
        k, c, alpha, sigma = linear_guided_eps(logsnr[t], w, *toy)
        x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # x̃ = x_k z + x_c
        if t == T - 1:
            return x_k * M_[0] + x_c, x_k ** 2 * V[0, 0]
        alpha_n, sigma_n = math.sqrt(sigmoid(logsnr[t + 1])), math.sqrt(sigmoid(-logsnr[t + 1]))
        h = (logsnr[t + 1] - logsnr[t]) / 2
        r = (logsnr[t] - logsnr[t - 1]) / 2 / h if t else None
        extra = 1 / (2 * r) if t and second_order else 0.0
        # D = (1 + extra) x̃ − extra x̃_prev, in terms of s = (z, x̃_prev): D = d · s + d_c
        d, d_c = np.array([(1 + extra) * x_k, -extra]), (1 + extra) * x_c
        shat, shat_n = sigma / alpha, sigma_n / alpha_n
        y_to_next = alpha_n * shat_n / shat * math.exp(-h) / alpha  # z′ coefficient on z
        one_minus = -math.expm1(-2 * h)  # 1 − e^{−2h}
        A = np.array([[y_to_next, 0.0], [x_k, 0.0]]) + np.outer([alpha_n * one_minus, 0.0], d)
        const = np.array([alpha_n * one_minus * d_c, x_c])
        noise = np.diag([(alpha_n * shat_n) ** 2 * one_minus, 0.0])
        M_, V = A @ M_ + const, A @ V @ A.T + noise


TOY = (1.0, 0.25, 0.0, 1.25)  # class N(1, 0.5²); "unconditional" N(0, 1.25): N(±1, 0.5²)'s moments


def toy_sample(toy, n, w, steps, sampler, seed, shape=(1,), clip_x=False, **kw):
    """sample() on a toy, n rows of label 0, unclipped, as a float64 numpy array."""
    x = draw(toy, torch.zeros(n, dtype=torch.long), w, seed, steps=steps, sampler=sampler,
             clip_x=clip_x, shape=shape, **kw)
    return x.double().numpy()


def continuous_law(kind, w, toy):
    """T → ∞ by solve_ivp: Algorithm 2 to first order in dλ is the reverse SDE dz = (½σ² z −
    σ ε̃) dλ + σ dW (any v); DDIM the probability-flow ODE dz = ½ (σ² z − σ ε̃) dλ. With
    ε̃ = σ (k z − c) the mean M and variance V obey linear ODEs."""
    def rhs(logsnr, y):
        M_, V = y
        k, c, _, sigma = linear_guided_eps(logsnr, w, *toy)
        if kind == "sde":
            return [sigma ** 2 * ((0.5 - k) * M_ + c), sigma ** 2 * ((1 - 2 * k) * V + 1)]
        return [0.5 * sigma ** 2 * ((1 - k) * M_ + c), sigma ** 2 * (1 - k) * V]
    M_, V = solve_ivp(rhs, (S.LOGSNR_MIN, S.LOGSNR_MAX), [0.0, 1.0], method="DOP853",
                      rtol=1e-11, atol=1e-12).y[:, -1]
    k, c, alpha, sigma = linear_guided_eps(S.LOGSNR_MAX, w, *toy)
    x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # the last x̃ at λ_max
    return x_k * M_ + x_c, x_k ** 2 * V


def assert_moments(x, mean, var, n_se=4.0, bias=0.0):
    """Sample mean and variance of x (n,) within n_se standard errors (+ a relative bias)."""
    n = len(x)
    assert abs(x.mean() - mean) < n_se * math.sqrt(var / n) + bias * math.sqrt(var), x.mean()
    assert abs(x.var() - var) < n_se * var * math.sqrt(2 / (n - 1)) + bias * var, x.var()


@pytest.mark.parametrize("w", [0.0, 2.0])
@pytest.mark.parametrize("sampler,v", [("ancestral", 0.0), ("ancestral", 0.3), ("ancestral", 1.0),
                                       ("ddim", 0.0), ("dpmpp2m-sde", 0.0)])
def test_output_law_equals_the_exact_law_of_the_chain(sampler, v, w):
    """T = 16 keeps the discretisation visible (v = 0, 0.3, 1: variances 30% apart): the
    variance blend, posterior mean, DDIM step and last x̃ are pinned to Monte Carlo error.
    dpmpp2m-sde (T = 12, λ evenly spaced): its 2M correction moves the variance by several
    Monte Carlo errors from the first-order chain's, so extrapolation and noise are pinned."""
    toy = PerLabelGaussianEps([TOY[0], TOY[2]], [TOY[1], TOY[3]])
    if sampler != "dpmpp2m-sde":
        x = toy_sample(toy, 20_000, w, 16, sampler, 1, v=v).flatten()
        assert_moments(x, *chain_law(16, sampler, v, w, TOY))
        return
    x = toy_sample(toy, 20_000, w, 12, sampler, 11).flatten()
    mean, var = sde2m_chain_law(12, w, TOY)
    assert_moments(x, mean, var)
    _, var_first_order = sde2m_chain_law(12, w, TOY, second_order=False)
    assert abs(var - var_first_order) > 6 * var * math.sqrt(2 / (len(x) - 1))


@pytest.mark.parametrize("sampler,v", [("ancestral", 0.0), ("ancestral", 0.3), ("ancestral", 1.0),
                                       ("ddim", 0.0), ("dpmpp2m-sde", 0.0)])
def test_many_steps_reproduce_the_data_distribution(sampler, v):
    """x ~ N(m, Σ), 2-D, full Σ, T = 1024: mean and covariance within 4 standard errors
    + 1.5% for the O(1/T) discretisation (chain_law: ≤ 1.2%)."""
    mean, cov = np.array([0.5, -0.3]), np.array([[0.25, 0.1], [0.1, 0.16]])
    x = toy_sample(MixtureEps([mean.tolist()], cov.tolist()), 20_000, 0.0, 1024, sampler, 2,
                   shape=(2,), v=v)
    n = len(x)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se_mean), x.mean(0)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / (n - 1))  # Gaussian
    assert np.all(np.abs(np.cov(x.T) - cov) < 4 * se_cov + 0.015 * np.abs(cov)), np.cov(x.T)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guidance_matches_the_reverse_sde_and_the_probability_flow_ode(w):
    """Class N(1, 0.5²) against N(0, 1.25): ε̃ is linear, the T → ∞ law Gaussian. SDE and
    ODE reach DIFFERENT laws, neither the tilt p(x|c)^{1+w} / p(x)^w (PAPER.md)."""
    toy = PerLabelGaussianEps([TOY[0], TOY[2]], [TOY[1], TOY[3]])
    sde, ode = continuous_law("sde", w, TOY), continuous_law("ode", w, TOY)
    precision = (1 + w) / TOY[1] - w / TOY[3]
    tilt_mean = ((1 + w) * TOY[0] / TOY[1] - w * TOY[2] / TOY[3]) / precision
    assert min(abs(sde[0] - ode[0]), abs(sde[0] - tilt_mean), abs(ode[0] - tilt_mean)) > 0.05
    assert sde[0] > TOY[0] + 0.15 and ode[0] > TOY[0] + 0.3  # away from the unconditional mean
    for sampler, ref in [("ancestral", sde), ("dpmpp2m-sde", sde), ("ddim", ode)]:
        x = toy_sample(toy, 20_000, w, 1024, sampler, 3)
        assert_moments(x.flatten(), *ref, bias=0.02)  # O(1/T): chain_law gives ≤ 1.3%


def guided_flow(toy, z1, labels, w, tol):
    """The guided probability-flow ODE dz/dλ = ½ (σ² z − σ ε̃) from z_1, per sample, by
    solve_ivp with ε̃ = guided_eps(toy, ...); returns x̃ = (z − σ ε̃)/α at λ_max."""
    n = len(z1)

    def rhs(logsnr, z):
        z = torch.from_numpy(z)[:, None]
        eps = G.guided_eps(toy, z, torch.full((n,), logsnr, dtype=torch.float64), labels, w)
        return (0.5 * (sigmoid(-logsnr) * z - math.sqrt(sigmoid(-logsnr)) * eps)).flatten().numpy()
    z_end = solve_ivp(rhs, (S.LOGSNR_MIN, S.LOGSNR_MAX), z1.flatten().numpy(), rtol=tol,
                      atol=tol / 10).y[:, -1]
    z_end = torch.from_numpy(z_end)[:, None]
    lam = torch.full((n,), S.LOGSNR_MAX, dtype=torch.float64)
    return S.predict_x(z_end, G.guided_eps(toy, z_end, lam, labels, w), S.LOGSNR_MAX)


def test_guided_samplers_follow_the_probability_flow_ode_per_sample():
    """Classes N(±1, 0.5²), the mixture's ε* for ∅, each sample from the same z_1: DDIM within
    0.03 of the guided flow (O(1/T) at T = 256) while w = 1, 3 push class +1 away by 0.3, 0.7;
    dpmpp2m at w = 3 within 5e-3 at 256 steps, over 3× closer than at 128 (second order)."""
    toy, n = MixtureEps([[1.0], [-1.0]], [[0.25]]), 500
    labels = torch.zeros(n, dtype=torch.long)
    z1 = torch.randn(n, 1, generator=torch.Generator().manual_seed(4)).double()
    means = []
    for w in (0.0, 1.0, 3.0):
        x_ode = guided_flow(toy, z1, labels, w, tol=1e-9).numpy()
        error = np.abs(toy_sample(toy, n, w, 256, "ddim", 4) - x_ode)
        assert error.max() < 0.03 and error.mean() < 0.005
        means.append(x_ode.mean())
    assert abs(means[0] - 1.0) < 4 * 0.5 / math.sqrt(n)  # w = 0: the class itself
    assert means[1] - means[0] > 0.25 and means[2] - means[1] > 0.25 and means[2] > 1.5
    errors = [np.abs(toy_sample(toy, n, 3.0, steps, "dpmpp2m", 4, spacing="uniform")
                     - x_ode).max() for steps in (128, 256)]  # x_ode: w = 3's
    assert errors[1] < 5e-3 and errors[0] / errors[1] > 3, errors


# ---------------- DPM-Solver++(2M): convergence and order

def exact_flow(z1, m, s2):
    """The probability-flow ODE for data N(m, s²), exactly: marginals N(α m, P_λ), P_λ =
    α² s² + σ², joined by the affine z_λ = α_λ m + sqrt(P_λ / P_λmin) (z_1 − α_λmin m).
    Returns x̃ = (z − σ ε*)/α at λ_max."""
    def alpha_sigma_p(logsnr):
        a2, s2_ = sigmoid(logsnr), sigmoid(-logsnr)
        return math.sqrt(a2), math.sqrt(s2_), a2 * s2 + s2_
    a0, _, p0 = alpha_sigma_p(S.LOGSNR_MIN)
    a1, s1, p1 = alpha_sigma_p(S.LOGSNR_MAX)
    z = a1 * m + math.sqrt(p1 / p0) * (z1 - a0 * m)
    eps = s1 * (z - a1 * m) / p1
    return (z - s1 * eps) / a1


def test_solvers_converge_to_the_exact_flow_at_their_order(float64_default):
    """Data N(0.3, 0.2²), λ evenly spaced: the error of ddim (order 1) and dpmpp2m (order 2)
    falls by 2^order (± 0.25) per doubling of steps from 32 on (at 16, steps of 2.7 in λ are
    too large for the asymptotic rate); at 24 steps dpmpp2m's is 5× smaller than DDIM's."""
    toy = PerLabelGaussianEps([0.3], [0.04])
    z1 = torch.randn(256, 1, generator=torch.Generator().manual_seed(6))
    exact = exact_flow(z1, 0.3, 0.04).numpy()
    errors = {sampler: np.array([np.abs(toy_sample(toy, 256, 0.0, steps, sampler, 6,
                                                   spacing="uniform") - exact).max()
                                 for steps in (24, 32, 64, 128, 256)])
              for sampler in ("ddim", "dpmpp2m")}
    for (sampler, e), order in zip(errors.items(), (1, 2)):
        orders = np.log2(e[1:-1] / e[2:])
        assert np.all(np.abs(orders - order) < 0.25), (sampler, e, orders)
    assert errors["ddim"][-1] < 2e-2 and errors["dpmpp2m"][-1] < 5e-4
    assert errors["dpmpp2m"][0] < errors["ddim"][0] / 5, errors


# ---------------- seeds, clipping, dynamic thresholding

def test_fixed_seed_is_identical_and_different_seeds_differ():
    unet, labels = tiny_unet(0), torch.tensor([0, 3, 7])
    for sampler in SM.SAMPLERS:
        run = functools.partial(draw, unet, labels, 1.0, steps=4, sampler=sampler)
        assert torch.equal(run(0), run(0))
        assert (run(0) - run(1)).abs().max() > 1e-2
    assert SM.sample(unet, labels, 0.0, steps=2).shape == (3, 1, 8, 8)  # shape from the config


def test_per_example_generators_make_each_sample_independent_of_its_batch():
    toy = MixtureEps([[1.0], [-1.0]], [[0.25]])
    labels, w = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0.0, 0.0, 2.0, 2.0, -1.0])

    def run(i, j):
        gens = [torch.Generator().manual_seed(s) for s in range(i, j)]
        return SM.sample(toy, labels[i:j], w[i:j], steps=8, clip_x=False, shape=(1,),
                         generator=gens)
    assert torch.equal(run(0, 5), torch.cat([run(0, 2), run(2, 3), run(3, 5)]))


@pytest.mark.parametrize("p", [0.995, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_threshold_against_numpy_percentile(p, dtype):
    """s = max(1, percentile_p |x̃|) per sample (numpy's linear interpolation), x̃ ←
    clip(x̃, −s, s)/s. Rows scaled by 0.2 … 4: some have s = 1 (the fixed clip), some s > 1."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.2, 0.5, 1, 2, 3, 4.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) * scale).to(dtype)
    xn = x.double().numpy()
    s = np.maximum(1.0, np.percentile(np.abs(xn).reshape(6, -1), 100 * p, axis=1))
    s = s.reshape(-1, 1, 1, 1)
    got = SM.dynamic_threshold(x, p)
    assert got.dtype == dtype
    close(got.double(), np.clip(xn, -s, s) / s, 1e-12 if dtype == torch.float64 else 1e-6)
    assert s.min() == 1.0 and s.max() > 1.5  # both cases are exercised
    assert torch.equal(SM.dynamic_threshold(x[:1], p), x[:1].clamp(-1, 1))  # s = 1: fixed clip


def test_clip_x_fixed_none_or_dynamic():
    """Data far outside [−1, 1]: clip_x=True bounds every x̃, False reaches the data. One
    step from λ_min with ε̃ = 0: clip_x=p is dynamic_threshold(z_1/α) of sample()'s first
    draw (numpy reference), True the fixed clip; bad clip_x values are refused."""
    run = functools.partial(toy_sample, MixtureEps([[3.0]], [[0.01]]), 200, 0.0, 64,
                            "ancestral", 5)
    assert np.abs(run(clip_x=True)).max() <= 1.0
    assert np.abs(run(clip_x=False) - 3.0).max() < 0.5

    def zero(model, z, logsnr, labels, w, state):
        return torch.zeros_like(z)
    labels = torch.zeros(4, dtype=torch.long)
    z = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(3)).double().numpy()
    x = z / math.sqrt(1 / (1 + math.exp(20.0)))  # x̃ = z / α at λ_min = −20
    s = np.maximum(1.0, np.percentile(np.abs(x).reshape(4, -1), 99.5, axis=1)).reshape(-1, 1, 1, 1)
    for sampler in SM.SAMPLERS:
        run = functools.partial(draw, None, labels, 0.0, 3, steps=1, sampler=sampler,
                                guidance=zero, shape=(1, 6, 6))
        close(run(clip_x=0.995).double(), np.clip(x, -s, s) / s, 1e-5)
        close(run(clip_x=True).double(), np.clip(x, -1, 1), 1e-6)
    for bad in (0.0, 1.5, 1, "dynamic", None):
        with pytest.raises(ValueError, match="clip_x"):
            SM.sample(None, labels, 0.0, steps=1, guidance=zero, shape=(1,), clip_x=bad)


# ---------------- command line

class Payload:
    """Any non-tensor class: pickling it puts code references in the file."""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d, unet = tmp_path_factory.mktemp("ckpts"), tiny_unet(0)
    state = unet.state_dict()
    good = {"model": state, "ema": state, "optimizer": {}, "step": 0,
            "config": dataclasses.asdict(unet.config), "args": {"dataset": "digits"}}
    M.save_checkpoint(good, str(d / "good.pt"))
    torch.save({**good, "payload": Payload()}, d / "pickled.pt")
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:5000])
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    unfit = {**good, "config": {**good["config"], "channels": 16}}
    M.save_checkpoint(unfit, str(d / "mismatch.pt"))
    (d / "a_file").write_text("")
    return d


BAD = [  # (arguments, a word the message must contain)
    (["--ckpt", "{d}/missing.pt"], "no checkpoint"), (["--ckpt", "{d}/pickled.pt"], "pickled"),
    (["--ckpt", "{d}/garbage.pt"], "not a readable checkpoint"),
    (["--ckpt", "{d}/truncated.pt"], "not a readable checkpoint"),
    (["--ckpt", "{d}/mismatch.pt"], "do not fit"),
    (["--classes", "10"], "outside"), (["--classes", "0-12"], "outside"),
    (["--classes", "three"], "range like 0-9"),
    (["--steps", "0"], "--steps"), (["--steps", "many"], "invalid int"),
    (["--v", "1.5"], "--v"), (["--v", "-0.1"], "--v"),
    (["--w", "0", "nan"], "finite"), (["--w", "inf"], "finite"),
    (["--n-per-class", "0"], "--n-per-class"), (["--batch-size", "0"], "--batch-size"),
    (["--sampler", "euler"], "invalid choice"),
    (["--clip", "maybe"], "percentile p in (0, 1]"), (["--clip", "0"], "percentile p in (0, 1]"),
    (["--out", "{d}/a_file/samples.png"], "cannot write"),
    (["--npz", "{d}/a_file/samples.npz"], "cannot write"),
    (["--json", "{d}/a_file/run.json"], "cannot write"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")])


@pytest.mark.parametrize("argv,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys, argv, word):
    args = ["--ckpt", f"{ckpts}/good.pt", "--steps", "2", "--out", str(tmp_path / "s.png")]
    argv = args + [a.format(d=ckpts) for a in argv]
    err = assert_one_line_exit_2(SM.main, argv, capsys, "sample.py: error:")
    assert word in err, err
    assert not list(tmp_path.iterdir())


def test_bad_input_in_a_real_process(ckpts):
    """A truncated checkpoint, from the shell: exit code 2, one line, no traceback."""
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", f"{ckpts}/truncated.pt"],
                          cwd=REPO, capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "not a readable checkpoint" in proc.stderr


def test_good_run_writes_the_grid_and_the_npz(ckpts, tmp_path):
    args = ["--ckpt", f"{ckpts}/good.pt", "--w", "0", "1", "-1", "--classes", "2,5-6",
            "--n-per-class", "2", "--steps", "3", "--seed", "0"]
    proc = subprocess.run([sys.executable, "sample.py", *args, "--out", str(tmp_path / "a.png"),
                           "--npz", str(tmp_path / "a.npz"), "--batch-size", "5"],
                          cwd=REPO, capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    png = imread(tmp_path / "a.png")
    assert png.ndim == 3 and png.shape[0] > 3 * 8 and png.shape[1] > 3 * 2 * 8
    data = np.load(tmp_path / "a.npz")
    assert data["images"].shape == (18, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [2, 2, 5, 5, 6, 6] * 3 and data["labels"].dtype == np.int64
    assert data["w"].tolist() == [0.0] * 6 + [1.0] * 6 + [-1.0] * 6
    # Same seed, other batch size: the same images (each image's noise has its own generator).
    SM.main(args + ["--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz"),
                    "--batch-size", "64"])
    other = np.load(tmp_path / "b.npz")["images"].astype(int)
    assert np.abs(other - data["images"].astype(int)).max() <= 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.npz", "a.png", "b.npz", "b.png"]  # no temporary files left


def test_default_picture_is_a_compact_grid_under_out(ckpts, tmp_path, monkeypatch):
    """No --out: out/samples.png, a row per w and GRID_PER_CLASS images per class (under
    ~1,500 px for ten classes); the npz keeps every image."""
    monkeypatch.chdir(tmp_path)
    SM.main(["--ckpt", f"{ckpts}/good.pt", "--w", "0", "1", "3", "--n-per-class", "8",
             "--steps", "2", "--npz", "all.npz"])
    png = imread(tmp_path / "out" / "samples.png")
    assert png.shape[1] < 1500 and png.shape[0] < png.shape[1]
    assert np.load(tmp_path / "all.npz")["images"].shape[0] == 3 * 10 * 8
    assert SM.GRID_PER_CLASS <= 3


def test_json_reports_the_run_as_asked(ckpts, tmp_path, capsys):
    """--json: its fields against the arguments and the npz's image count; the person's
    last line is still printed. Without --npz, "npz" is null; no --steps: the sampler's T."""
    out, npz, report = (str(tmp_path / name) for name in ("a.png", "a.npz", "run.json"))
    def read():
        with open(report) as f:
            return json.load(f)
    args = ["--ckpt", f"{ckpts}/good.pt", "--out", out, "--json", report]
    SM.main(args + ["--w", "0", "2.5", "--classes", "1,4-5", "--n-per-class", "3", "--sampler",
                    "ddim", "--steps", "2", "--guidance", "rescale", "--npz", npz])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("18 images in ")
    got = read()
    assert got.pop("seconds") > 0 and got == {
        "images": len(np.load(npz)["images"]), "processes": 1, "out": out, "npz": npz,
        "w": [0.0, 2.5], "classes": [1, 4, 5], "n_per_class": 3, "sampler": "ddim", "steps": 2,
        "guidance": "rescale"} and got["images"] == 18
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "a.png", "run.json"]  # no temporary file
    SM.main(args + ["--w", "1", "--classes", "0", "--n-per-class", "1", "--sampler", "dpmpp2m"])
    got = read()
    assert (got["npz"], got["images"], got["steps"]) == (None, 1, SM.SAMPLERS["dpmpp2m"]["steps"])

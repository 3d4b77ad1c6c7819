"""sample.py against independent references, never against its own recorded output.

- guided_eps: w = 0 and w = −1 against separate evaluations of the network; the one 2B batch and
  the two B passes against (1 + w) ε_c − w ε_u in float64; a stub that records the model's calls.
- Gaussian toys with exact ε* (closed forms, below): then every reference is computed in float64
  numpy/scipy from PAPER.md's formulas, without sample.py:
  * the exact law of Algorithm 2's Markov chain (a linear-Gaussian recursion) at small T;
  * the data distribution itself at large T (mean and covariance, Monte Carlo tolerances);
  * with guidance, the T → ∞ limits: the reverse SDE for the ancestral sampler and the
    probability-flow ODE for DDIM (moment ODEs, and a per-sample ODE solve with solve_ivp).
- seeds, clipping, and the CLI (bad inputs table-driven; a good run's PNG and npz).
"""
import dataclasses
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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    """A small U-Net with random weights, its zero-initialised layers too (they would give ε ≡ 0)."""
    torch.manual_seed(0)
    net = M.UNet(M.PRESETS["digits"]).eval().requires_grad_(False)
    for p in net.parameters():
        if not p.any():
            p.normal_(0, 0.1)
    return net


def unet_inputs(B=6):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, 1, 8, 8, generator=g)
    logsnr = torch.linspace(-6, 6, B)
    return z, logsnr, torch.arange(B) % 10


# ---------------------------------------------------------------- guided_eps


def test_w0_is_the_conditional_model_and_w_minus1_the_unconditional(unet):
    z, logsnr, labels = unet_inputs()
    eps_cond = unet(z, logsnr, labels)
    eps_uncond = unet(z, logsnr, torch.full_like(labels, unet.null_label))
    assert (eps_cond - eps_uncond).abs().max() > 1e-2  # the label matters, so the test can fail
    assert torch.equal(G.guided_eps(unet, z, logsnr, labels, 0.0), eps_cond)  # the same single pass
    assert torch.allclose(G.guided_eps(unet, z, logsnr, labels, -1.0), eps_uncond, rtol=0, atol=1e-6)


def test_guided_eps_equals_two_separate_evaluations(unet):
    """Per-example w (any real value, 0 and −1 among them) and scalar w, against (1 + w) ε_c − w ε_u
    formed in float64 from two separate evaluations."""
    z, logsnr, labels = unet_inputs()
    eps_cond = unet(z, logsnr, labels).double()
    eps_uncond = unet(z, logsnr, torch.full_like(labels, unet.null_label)).double()
    w = torch.tensor([0.0, -1.0, 0.3, 1.0, 4.0, -2.5])
    ref = (1 + w.double()[:, None, None, None]) * eps_cond - w.double()[:, None, None, None] * eps_uncond
    assert torch.allclose(G.guided_eps(unet, z, logsnr, labels, w).double(), ref, rtol=0, atol=1e-5)
    ref = 3.0 * eps_cond - 2.0 * eps_uncond
    assert torch.allclose(G.guided_eps(unet, z, logsnr, labels, 2.0).double(), ref, rtol=0, atol=1e-5)


class RecordingStub(torch.nn.Module):
    """ε(z, λ, c) = c + z: a closed form, and a record of every call's batch size and labels."""

    null_label = 7

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, logsnr, labels):
        assert logsnr.shape == (len(z),)
        self.calls.append((len(z), labels.tolist()))
        return labels.to(z.dtype).reshape(-1, *[1] * (z.ndim - 1)) + z


@pytest.mark.parametrize("one_batch", [True, False], ids=["one batch of 2B", "two passes of B"])
def test_w0_runs_one_B_pass_and_guidance_one_2B_batch(one_batch, monkeypatch):
    """w = 0: one pass of B. Guidance: ε_θ(z, c) and ε_θ(z, ∅) as one batch of 2B or as two passes of B, as
    guidance.ONE_BATCH says for the device, with the same ε̃ either way."""
    monkeypatch.setitem(G.ONE_BATCH, "cpu", one_batch)
    stub, z, labels = RecordingStub(), torch.zeros(3, 2), torch.tensor([1, 2, 3])
    guided = [(6, [1, 2, 3, 7, 7, 7])] if one_batch else [(3, [1, 2, 3]), (3, [7, 7, 7])]
    for w, calls in [(0.0, [(3, [1, 2, 3])]), (torch.zeros(3), [(3, [1, 2, 3])]),
                     (2.0, guided), (torch.tensor([0.0, 1.0, 0.0]), guided)]:
        stub.calls = []
        eps = G.guided_eps(stub, z, torch.zeros(3), labels, w)
        w = torch.as_tensor(w).reshape(-1, 1)
        assert stub.calls == calls and torch.equal(eps, (1 + w) * labels[:, None] - w * 7 + 0 * z)
    # The whole sampler, every step kind: T steps, each one pass of B or the guided evaluations; progress(t, T).
    for sampler in SM.SAMPLERS:
        for w, sizes in [(0.0, [3]), (1.5, [n for n, _ in guided])]:
            stub.calls, seen = [], []
            SM.sample(stub, labels, w, steps=5, sampler=sampler, shape=(2,), clip_x=False,
                      progress=lambda t, T: seen.append((t, T)))
            assert [n for n, _ in stub.calls] == sizes * 5 and seen == [(t, 5) for t in range(1, 6)]


def test_a_guidance_rule_plugs_into_every_sampler():
    """sample() calls the rule it is given, with (model, z, λ_t, labels, w, state), once per step, at the λ_t of
    the chosen spacing, with one state dict for the whole run, and uses its ε̃ as Alg. 2 line 4 does."""
    for sampler in SM.SAMPLERS:
        for spacing in ("cosine", "uniform"):
            seen, states = [], []

            def rule(model, z, logsnr, labels, w, state):
                seen.append((model, logsnr.tolist(), labels.tolist(), w))
                states.append(state)
                return torch.zeros_like(z)  # ε̃ = 0: x̃ = z / α

            x = SM.sample("the model", torch.tensor([4, 2]), 0.5, steps=6, sampler=sampler, spacing=spacing,
                          guidance=rule, shape=(3,), clip_x=False, generator=torch.Generator().manual_seed(0))
            grid = SM.logsnr_steps(6, spacing)
            assert [m for m, _, _, _ in seen] == ["the model"] * 6 and all(w == 0.5 for *_, w in seen)
            assert all(lab == [4, 2] for _, _, lab, _ in seen)
            assert np.allclose([lam for _, lam, _, _ in seen], grid[:, None].expand(6, 2).numpy(), atol=1e-5)
            assert x.shape == (2, 3) and torch.isfinite(x).all()
            assert states[0] == {} and all(state is states[0] for state in states)


# ---------------------------------------------------------------- Gaussian toys with exact ε*


class MixtureEps(torch.nn.Module):
    """Exact ε* for x | c ~ N(m_c, Σ) (shared Σ, equal priors); the null label gets the mixture's ε*.

    z_λ | c ~ N(α m_c, Σ_λ), Σ_λ = α² Σ + σ² I, so ε*(z, c) = −σ ∇ log p(z | c) = σ Σ_λ⁻¹ (z − α m_c), and
    for the mixture ε*(z) = σ Σ_λ⁻¹ (z − α E[m_c | z_λ]) with E[m_c | z_λ] from Bayes (a softmax).
    Computed in float64 in the eigenbasis of Σ, where Σ_λ is diagonal.
    """

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
        logits = -0.5 * ((y[:, None] - alpha[:, None] * self.means) ** 2 / var[:, None]).sum(-1)  # (B, K)
        mean_mix = torch.softmax(logits, dim=1) @ self.means
        is_null = (labels == self.null_label)[:, None]
        mean = torch.where(is_null, mean_mix, self.means[labels.clamp(max=len(self.means) - 1)])
        return (sigma * (y - alpha * mean) / var @ self.Q.T).to(z.dtype)


class PerLabelGaussianEps(torch.nn.Module):
    """Exact ε* when each label (the null label last) has its own 1-D Gaussian x | l ~ N(m_l, s_l²):
    ε*(z, l) = σ (z − α m_l) / (α² s_l² + σ²). With guidance ε̃ is then linear in z."""

    def __init__(self, means, variances):
        super().__init__()
        self.m, self.s2 = torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64)
        self.null_label = len(means) - 1

    def forward(self, z, logsnr, labels):
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64).expand(len(z))[:, None]  # (B, 1)
        alpha2, sigma2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)
        m, s2 = self.m[labels][:, None], self.s2[labels][:, None]
        return (sigma2.sqrt() * (z.double() - alpha2.sqrt() * m) / (alpha2 * s2 + sigma2)).to(z.dtype)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logsnr_grid(T):
    """λ_1 = λ_min < … < λ_T = λ_max: λ = −2 log tan(a u + b) at evenly spaced u from 1 to 0 (PAPER.md)."""
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    return -2 * np.log(np.tan(a * np.linspace(1, 0, T) + b))


def linear_guided_eps(logsnr, w, m_c, s2_c, m_u, s2_u):
    """ε̃ = (1 + w) ε*(z, c) − w ε*(z, ∅) = σ (k z − c) for the per-label Gaussian toy; returns k, c, α, σ."""
    alpha2, sigma2 = sigmoid(logsnr), sigmoid(-logsnr)
    p_c, p_u = alpha2 * s2_c + sigma2, alpha2 * s2_u + sigma2
    k = (1 + w) / p_c - w / p_u
    c = math.sqrt(alpha2) * ((1 + w) * m_c / p_c - w * m_u / p_u)
    return k, c, math.sqrt(alpha2), math.sqrt(sigma2)


def chain_law(T, sampler, v, w, toy):
    """Mean and variance of Algorithm 2's output (or DDIM's), exactly: every step is an affine map of z
    plus independent Gaussian noise, z ~ N(M, V) throughout. Scalar float64, written from PAPER.md."""
    logsnr, M_, V = logsnr_grid(T), 0.0, 1.0  # z_1 ~ N(0, 1)
    for t in range(T):
        k, c, alpha, sigma = linear_guided_eps(logsnr[t], w, *toy)
        x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # x̃ = (z − σ ε̃)/α = x_k z + x_c
        if t == T - 1:
            return x_k * M_ + x_c, x_k ** 2 * V
        alpha_n, sigma_n = math.sqrt(sigmoid(logsnr[t + 1])), math.sqrt(sigmoid(-logsnr[t + 1]))
        if sampler == "ddim":  # z' = α' x̃ + σ' (z − α x̃)/σ
            z_k = alpha_n * x_k + sigma_n * (1 - alpha * x_k) / sigma
            z_c, var = (alpha_n - sigma_n * alpha / sigma) * x_c, 0.0
        else:  # z' = e^{λ−λ'} (α'/α) z + (1 − e^{λ−λ'}) α' x̃ + noise, variance (σ̃²)^{1−v} (σ²_{λ|λ'})^v
            r = math.exp(logsnr[t] - logsnr[t + 1])
            z_k, z_c = r * alpha_n / alpha + (1 - r) * alpha_n * x_k, (1 - r) * alpha_n * x_c
            var = ((1 - r) * sigma_n ** 2) ** (1 - v) * ((1 - r) * sigma ** 2) ** v
        M_, V = z_k * M_ + z_c, z_k ** 2 * V + var


def sde2m_chain_law(T, w, toy, second_order=True):
    """The exact output law of SDE-DPM-Solver++(2M), written from Lu et al.'s update in VE coordinates y = z/α,
    σ̂ = σ/α = e^{−λ/2} (k-diffusion's dpmpp_2m_sde, η = 1, midpoint): with h = (λ′ − λ)/2 and r = h_prev/h,
    y′ = (σ̂′/σ̂) e^{−h} y + (1 − e^{−2h}) [x̃ + (x̃ − x̃_prev)/(2r)] + σ̂′ (1 − e^{−2h})^{1/2} n, then z′ = α′ y′.
    Every step is affine in the state s = (z, x̃_prev) plus Gaussian noise: s ~ N(M, V) with a 2×2 V. λ evenly
    spaced. second_order=False drops the x̃_prev term: the first-order SDE step."""
    logsnr = np.linspace(S.LOGSNR_MIN, S.LOGSNR_MAX, T)
    M_, V = np.zeros(2), np.diag([1.0, 0.0])  # z_1 ~ N(0, 1); no x̃_prev yet
    for t in range(T):
        k, c, alpha, sigma = linear_guided_eps(logsnr[t], w, *toy)
        x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # x̃ = x_k z + x_c
        if t == T - 1:
            return x_k * M_[0] + x_c, x_k ** 2 * V[0, 0]
        alpha_n, sigma_n = math.sqrt(sigmoid(logsnr[t + 1])), math.sqrt(sigmoid(-logsnr[t + 1]))
        h = (logsnr[t + 1] - logsnr[t]) / 2
        extra = 0.0 if t == 0 or not second_order else 1 / (2 * (logsnr[t] - logsnr[t - 1]) / 2 / h)  # 1/(2r)
        # D = (1 + extra) x̃ − extra x̃_prev, in terms of s = (z, x̃_prev): D = d · s + d_c
        d, d_c = np.array([(1 + extra) * x_k, -extra]), (1 + extra) * x_c
        shat, shat_n = sigma / alpha, sigma_n / alpha_n
        y_to_next = alpha_n * shat_n / shat * math.exp(-h) / alpha  # z′ coefficient on z (y = z/α)
        A = np.array([[y_to_next, 0.0], [x_k, 0.0]]) + np.outer([alpha_n * -math.expm1(-2 * h), 0.0], d)
        const = np.array([alpha_n * -math.expm1(-2 * h) * d_c, x_c])
        noise = np.diag([(alpha_n * shat_n) ** 2 * -math.expm1(-2 * h), 0.0])
        M_, V = A @ M_ + const, A @ V @ A.T + noise


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_sde_dpmpp2m_output_law_equals_the_exact_law_of_its_chain(w):
    """T = 12, λ evenly spaced: the 2M correction changes the output variance by several Monte Carlo errors
    against the first-order chain (ancestral, v = 0), so the extrapolation, the step and the noise are pinned."""
    toy = PerLabelGaussianEps([TOY[0], TOY[2]], [TOY[1], TOY[3]])
    x = SM.sample(toy, torch.zeros(20_000, dtype=torch.long), w, steps=12, sampler="dpmpp2m-sde", clip_x=False,
                  shape=(1,), generator=torch.Generator().manual_seed(11)).double().flatten().numpy()
    mean, var = sde2m_chain_law(12, w, TOY)
    assert_moments(x, mean, var)
    _, var_first_order = sde2m_chain_law(12, w, TOY, second_order=False)
    assert abs(var - var_first_order) > 6 * var * math.sqrt(2 / (len(x) - 1)), (var, var_first_order)


def continuous_law(kind, w, toy):
    """T → ∞ limits, solved with solve_ivp in float64. Expanding one step of Algorithm 2 to first order in
    dλ gives the reverse SDE dz = (½σ² z − σ ε̃) dλ + σ dW (for every v); DDIM gives the probability-flow
    ODE dz = ½ (σ² z − σ ε̃) dλ. With ε̃ = σ (k z − c) the mean M and variance V obey linear ODEs."""
    def rhs(logsnr, y):
        M_, V = y
        k, c, _, sigma = linear_guided_eps(logsnr, w, *toy)
        if kind == "sde":
            return [sigma ** 2 * ((0.5 - k) * M_ + c), sigma ** 2 * ((1 - 2 * k) * V + 1)]
        return [0.5 * sigma ** 2 * ((1 - k) * M_ + c), sigma ** 2 * (1 - k) * V]
    M_, V = solve_ivp(rhs, (S.LOGSNR_MIN, S.LOGSNR_MAX), [0.0, 1.0], method="DOP853", rtol=1e-11, atol=1e-12).y[:, -1]
    k, c, alpha, sigma = linear_guided_eps(S.LOGSNR_MAX, w, *toy)
    x_k, x_c = (1 - sigma ** 2 * k) / alpha, sigma ** 2 * c / alpha  # the last x̃ at λ_max
    return x_k * M_ + x_c, x_k ** 2 * V


def assert_moments(x, mean, var, n_se=4.0, bias=0.0):
    """Sample mean and variance of x (n,) within n_se Monte Carlo standard errors (+ a relative bias)."""
    n = len(x)
    assert abs(x.mean() - mean) < n_se * math.sqrt(var / n) + bias * math.sqrt(var), (x.mean(), mean)
    assert abs(x.var() - var) < n_se * var * math.sqrt(2 / (n - 1)) + bias * var, (x.var(), var)


TOY = (1.0, 0.25, 0.0, 1.25)  # class N(1, 0.5²); "unconditional" N(0, 1.25), the moments of the mixture N(±1, 0.5²)


@pytest.mark.parametrize("w", [0.0, 2.0])
@pytest.mark.parametrize("sampler,v", [("ancestral", 0.0), ("ancestral", 0.3), ("ancestral", 1.0), ("ddim", 0.0)])
def test_output_law_equals_the_exact_law_of_the_chain(sampler, v, w):
    """T = 16 keeps the discretisation visible (v = 0, 0.3, 1 give variances 30% apart), so the variance
    blend, the posterior mean, the DDIM step and the final x̃ are each pinned to Monte Carlo error."""
    toy = PerLabelGaussianEps([TOY[0], TOY[2]], [TOY[1], TOY[3]])
    x = SM.sample(toy, torch.zeros(20_000, dtype=torch.long), w, steps=16, v=v, sampler=sampler, clip_x=False,
                  shape=(1,), generator=torch.Generator().manual_seed(1))
    assert_moments(x.double().flatten().numpy(), *chain_law(16, sampler, v, w, TOY))


@pytest.mark.parametrize("sampler,v", [("ancestral", 0.0), ("ancestral", 0.3), ("ancestral", 1.0), ("ddim", 0.0),
                                       ("dpmpp2m-sde", 0.0)])
def test_many_steps_reproduce_the_data_distribution(sampler, v):
    """x ~ N(m, Σ) in 2-D with a full Σ; exact ε*; T = 1024. Mean and covariance within 4 Monte Carlo
    standard errors, plus 1.5% for the remaining O(1/T) discretisation (chain_law: ≤ 1.2% here)."""
    mean, cov = np.array([0.5, -0.3]), np.array([[0.25, 0.1], [0.1, 0.16]])
    x = SM.sample(MixtureEps([mean.tolist()], cov.tolist()), torch.zeros(20_000, dtype=torch.long), 0.0,
                  steps=1024, v=v, sampler=sampler, clip_x=False, shape=(2,),
                  generator=torch.Generator().manual_seed(2)).double().numpy()
    n = len(x)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se_mean), x.mean(0)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / (n - 1))  # Gaussian sample covariance
    assert np.all(np.abs(np.cov(x.T) - cov) < 4 * se_cov + 0.015 * np.abs(cov)), np.cov(x.T)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guidance_matches_the_reverse_sde_and_the_probability_flow_ode(w):
    """Class N(1, 0.5²) guided against N(0, 1.25): ε̃ is linear, so the T → ∞ output law is Gaussian with
    moments from continuous_law. The two samplers then converge to DIFFERENT laws, neither of which is the
    tilted density p(x|c)^{1+w} / p(x)^w (PAPER.md: guidance at every noise level is not the tilt)."""
    toy = PerLabelGaussianEps([TOY[0], TOY[2]], [TOY[1], TOY[3]])
    sde, ode = continuous_law("sde", w, TOY), continuous_law("ode", w, TOY)
    precision = (1 + w) / TOY[1] - w / TOY[3]
    tilt_mean = ((1 + w) * TOY[0] / TOY[1] - w * TOY[2] / TOY[3]) / precision
    assert min(abs(sde[0] - ode[0]), abs(sde[0] - tilt_mean), abs(ode[0] - tilt_mean)) > 0.05
    assert sde[0] > TOY[0] + 0.15 and ode[0] > TOY[0] + 0.3  # pushed away from the unconditional mean
    for sampler, ref in [("ancestral", sde), ("dpmpp2m-sde", sde), ("ddim", ode)]:
        x = SM.sample(toy, torch.zeros(20_000, dtype=torch.long), w, steps=1024, sampler=sampler, clip_x=False,
                      shape=(1,), generator=torch.Generator().manual_seed(3))
        assert_moments(x.double().flatten().numpy(), *ref, bias=0.02)  # O(1/T): chain_law gives ≤ 1.3%


def guided_flow(toy, z1, labels, w, tol):
    """The guided probability-flow ODE dz/dλ = ½ (σ² z − σ ε̃) from z_1 at λ_min to λ_max, per sample, by
    solve_ivp in float64 with ε̃ = guided_eps(toy, ...); returns x̃ = (z − σ ε̃)/α at λ_max, as the sampler does."""
    n = len(z1)

    def rhs(logsnr, z):
        z = torch.from_numpy(z)[:, None]
        eps = G.guided_eps(toy, z, torch.full((n,), logsnr, dtype=torch.float64), labels, w)
        return (0.5 * (sigmoid(-logsnr) * z - math.sqrt(sigmoid(-logsnr)) * eps)).flatten().numpy()
    z_end = solve_ivp(rhs, (S.LOGSNR_MIN, S.LOGSNR_MAX), z1.flatten().numpy(), rtol=tol, atol=tol / 10).y[:, -1]
    z_end = torch.from_numpy(z_end)[:, None]
    eps_end = G.guided_eps(toy, z_end, torch.full((n,), S.LOGSNR_MAX, dtype=torch.float64), labels, w)
    return S.predict_x(z_end, eps_end, S.LOGSNR_MAX)


def test_two_class_guidance_follows_the_probability_flow_ode_per_sample():
    """Classes N(±1, 0.5²), equal priors, the exact mixture ε* for ∅. DDIM from the same z_1 (Alg. 2, line 1
    is the sampler's first draw) against the probability-flow ODE dz/dλ = ½ (σ² z − σ ε̃) solved by
    solve_ivp in float64 with the same ε̃: each sample within 0.03 (O(1/T) at T = 256), while w = 1 and
    w = 3 move the class-(+1) samples away from the other class by 0.3 and 0.7."""
    toy, n = MixtureEps([[1.0], [-1.0]], [[0.25]]), 500
    labels = torch.zeros(n, dtype=torch.long)
    z1 = torch.randn(n, 1, generator=torch.Generator().manual_seed(4)).double()
    means = []
    for w in (0.0, 1.0, 3.0):
        x_ode = guided_flow(toy, z1, labels, w, tol=1e-9)
        x = SM.sample(toy, labels, w, steps=256, sampler="ddim", clip_x=False, shape=(1,),
                      generator=torch.Generator().manual_seed(4)).double()
        assert (x - x_ode).abs().max() < 0.03 and (x - x_ode).abs().mean() < 0.005
        means.append(x_ode.mean().item())
    assert abs(means[0] - 1.0) < 4 * 0.5 / math.sqrt(n)  # w = 0: the class itself
    assert means[1] - means[0] > 0.25 and means[2] - means[1] > 0.25


# ---------------------------------------------------------------- DPM-Solver++(2M): convergence and order


def exact_flow(z1, m, s2):
    """The probability-flow ODE dz/dλ = ½ (σ² z − σ ε*) for data N(m, s²) solved exactly from λ_min to λ_max:
    the marginals are N(α m, P_λ), P_λ = α² s² + σ², and the flow is the affine map between them,
    z_λ = α_λ m + sqrt(P_λ / P_λmin) (z_1 − α_λmin m). Returns the sampler's output x̃ = (z − σ ε*)/α at λ_max."""
    def alpha_sigma_p(logsnr):
        a2, s2_ = sigmoid(logsnr), sigmoid(-logsnr)
        return math.sqrt(a2), math.sqrt(s2_), a2 * s2 + s2_
    a0, _, p0 = alpha_sigma_p(S.LOGSNR_MIN)
    a1, s1, p1 = alpha_sigma_p(S.LOGSNR_MAX)
    z = a1 * m + math.sqrt(p1 / p0) * (z1 - a0 * m)
    eps = s1 * (z - a1 * m) / p1
    return (z - s1 * eps) / a1


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp2m", 2)])
def test_solvers_converge_to_the_exact_flow_at_their_order(sampler, order, float64_default):
    """Data N(0.3, 0.2²), exact ε*, λ evenly spaced: the endpoint error against the exact flow falls by 2^order
    each time the number of steps doubles (empirical order within 0.25 of the theoretical one, from 32
    steps on: at 16 the steps of 2.7 in λ are too large for the asymptotic rate)."""
    toy = PerLabelGaussianEps([0.3], [0.04])
    z1 = torch.randn(256, 1, generator=torch.Generator().manual_seed(6))
    exact = exact_flow(z1, 0.3, 0.04)
    errors = []
    for steps in (32, 64, 128, 256):
        x = SM.sample(toy, torch.zeros(256, dtype=torch.long), 0.0, steps=steps, sampler=sampler, spacing="uniform",
                      clip_x=False, shape=(1,), generator=torch.Generator().manual_seed(6))
        errors.append((x - exact).abs().max().item())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(orders - order) < 0.25), (errors, orders)
    assert errors[-1] < (2e-2 if order == 1 else 5e-4)


def test_dpmpp2m_beats_ddim_at_equal_steps(float64_default):
    toy = PerLabelGaussianEps([0.3], [0.04])
    z1 = torch.randn(256, 1, generator=torch.Generator().manual_seed(7))
    exact = exact_flow(z1, 0.3, 0.04)
    err = {sampler: (SM.sample(toy, torch.zeros(256, dtype=torch.long), 0.0, steps=24, sampler=sampler,
                               spacing="uniform", clip_x=False, shape=(1,),
                               generator=torch.Generator().manual_seed(7)) - exact).abs().max().item()
           for sampler in ("ddim", "dpmpp2m")}
    assert err["dpmpp2m"] < err["ddim"] / 5, err


def test_guided_dpmpp2m_follows_the_probability_flow_ode_per_sample():
    """Two classes N(±1, 0.5²), exact scores, w = 3: dpmpp2m against solve_ivp on the guided probability-flow
    ODE dz/dλ = ½ (σ² z − σ ε̃) from the same z_1: every sample within 5e-3 at 256 steps, and the error
    falls about 4-fold from 128 steps (second order; DDIM's halves)."""
    toy, n, w = MixtureEps([[1.0], [-1.0]], [[0.25]]), 300, 3.0
    labels = torch.zeros(n, dtype=torch.long)
    z1 = torch.randn(n, 1, generator=torch.Generator().manual_seed(8)).double()
    x_ode = guided_flow(toy, z1, labels, w, tol=1e-10)
    errors = [(SM.sample(toy, labels, w, steps=steps, sampler="dpmpp2m", spacing="uniform", clip_x=False, shape=(1,),
                         generator=torch.Generator().manual_seed(8)).double() - x_ode).abs().max().item()
              for steps in (128, 256)]
    assert errors[1] < 5e-3 and errors[0] / errors[1] > 3, errors
    assert x_ode.mean() > 1.5  # guidance moved the samples well away from the class mean 1


# ---------------------------------------------------------------- seeds and clipping


def test_fixed_seed_is_identical_and_different_seeds_differ(unet):
    labels = torch.tensor([0, 3, 7])
    run = lambda seed, sampler: SM.sample(unet, labels, 1.0, steps=4, sampler=sampler,
                                          generator=torch.Generator().manual_seed(seed))
    for sampler in SM.SAMPLERS:
        assert torch.equal(run(0, sampler), run(0, sampler))
        assert (run(0, sampler) - run(1, sampler)).abs().max() > 1e-2
    assert SM.sample(unet, labels, 0.0, steps=2).shape == (3, 1, 8, 8)  # shape from model.config


def test_per_example_generators_make_each_sample_independent_of_its_batch():
    toy = MixtureEps([[1.0], [-1.0]], [[0.25]])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    labels, w = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0.0, 0.0, 2.0, 2.0, -1.0])
    whole = SM.sample(toy, labels, w, steps=8, clip_x=False, shape=(1,), generator=gens(range(5)))
    parts = [SM.sample(toy, labels[i:j], w[i:j], steps=8, clip_x=False, shape=(1,), generator=gens(range(i, j)))
             for i, j in [(0, 2), (2, 3), (3, 5)]]
    assert torch.equal(whole, torch.cat(parts))


def test_clip_x_bounds_every_prediction():
    toy = MixtureEps([[3.0]], [[0.01]])  # data far outside [−1, 1]
    run = lambda clip: SM.sample(toy, torch.zeros(200, dtype=torch.long), 0.0, steps=64, clip_x=clip, shape=(1,),
                                 generator=torch.Generator().manual_seed(5))
    assert run(True).abs().max() <= 1.0
    assert (run(False) - 3.0).abs().max() < 0.5


# ---------------------------------------------------------------- command line


class Payload:
    """Any non-tensor class: pickling it puts code references in the file."""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, unet):
    d = tmp_path_factory.mktemp("ckpts")
    state = unet.state_dict()
    good = {"model": state, "ema": state, "optimizer": {}, "step": 0, "config": dataclasses.asdict(unet.config),
            "args": {"dataset": "digits"}}
    M.save_checkpoint(good, str(d / "good.pt"))
    torch.save({**good, "payload": Payload()}, d / "pickled.pt")
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:5000])
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    M.save_checkpoint({**good, "config": {**good["config"], "channels": 16}}, str(d / "mismatch.pt"))
    (d / "a_file").write_text("")
    return d


BAD = [  # (arguments, a word the message must contain)
    (["--ckpt", "{d}/missing.pt"], "no checkpoint"),
    (["--ckpt", "{d}/garbage.pt"], "not a readable checkpoint"),
    (["--ckpt", "{d}/truncated.pt"], "not a readable checkpoint"),
    (["--ckpt", "{d}/pickled.pt"], "pickled"),
    (["--ckpt", "{d}/mismatch.pt"], "do not fit"),
    (["--classes", "10"], "outside"),
    (["--classes", "0-12"], "outside"),
    (["--classes", "three"], "range like 0-9"),
    (["--steps", "0"], "--steps"),
    (["--v", "1.5"], "--v"),
    (["--v", "-0.1"], "--v"),
    (["--w", "0", "nan"], "finite"),
    (["--w", "inf"], "finite"),
    (["--n-per-class", "0"], "--n-per-class"),
    (["--batch-size", "0"], "--batch-size"),
    (["--sampler", "euler"], "invalid choice"),
    (["--clip", "maybe"], "percentile p in (0, 1]"),
    (["--clip", "0"], "percentile p in (0, 1]"),
    (["--out", "/nonexistent-dir/samples.png"], "cannot write"),
    (["--npz", "{d}/a_file/samples.npz"], "cannot write"),
    (["--steps", "many"], "invalid int"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")])


@pytest.mark.parametrize("argv,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys, argv, word):
    args = ["--ckpt", f"{ckpts}/good.pt", "--steps", "2", "--out", str(tmp_path / "s.png")]
    err = assert_one_line_exit_2(SM.main, args + [a.format(d=ckpts) for a in argv], capsys, "sample.py: error:")
    assert word in err, err
    assert not list(tmp_path.iterdir())


def test_bad_input_in_a_real_process(ckpts):
    """A truncated checkpoint, from the shell: exit code 2, one line, no traceback."""
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", f"{ckpts}/truncated.pt"], cwd=REPO,
                          capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "not a readable checkpoint" in proc.stderr


def test_good_run_writes_the_grid_and_the_npz(ckpts, tmp_path):
    args = ["--ckpt", f"{ckpts}/good.pt", "--w", "0", "1", "-1", "--classes", "2,5-6", "--n-per-class", "2",
            "--steps", "3", "--seed", "0"]
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
    SM.main(args + ["--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz"), "--batch-size", "64"])
    other = np.load(tmp_path / "b.npz")["images"].astype(int)
    assert np.abs(other - data["images"].astype(int)).max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.png", "b.npz", "b.png"]  # no temp files


def test_the_command_line_stays_short_and_the_library_imports_only_the_method_files():
    """sample.py's main is at most 120 lines with at most 16 flags (rule options travel as -p KEY=VALUE), and the
    module imports no project file but schedule, model and guidance at its top (fast_cpu only inside main)."""
    import ast
    with open(os.path.join(REPO, "sample.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 120
    flags = [c for c in ast.walk(main) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "add_argument"]
    assert 0 < len(flags) <= 16
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    project = {os.path.splitext(p)[0] for p in os.listdir(REPO) if p.endswith(".py")}
    assert top & project == {"schedule", "model", "guidance"}
    assert not top & {"matplotlib", "tqdm"}

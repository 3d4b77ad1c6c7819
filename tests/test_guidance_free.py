"""Guidance-free training (train.gft_loss, model.py's strength input,
guidance.guidance_free_eps) against independent references.

- On a 2-D Gaussian mixture, float64: at fixed (z_λ, λ, c, β) the loss's minimiser
  (E[ε | z, c] − (1 − β) ε*(z, ∅))/β, by Gaussian conditioning and by importance sampling, is
  CFG's (1 + w) ε*(z, c) − w ε*(z, ∅) at w = 1/β − 1; a model linear in features, fitted to
  gft_loss's own draws, converges to it.
- The stop-gradient and the two passes (the constant one: no gradient, no dropout, ∅, β = 1);
  β ≡ 1 is train.diffusion_loss.
- Without the option, an old checkpoint gives the same outputs; with it, the network starts
  as the one without (zero-initialised last layer).
- The rule: one evaluation per step at β = 1/(1 + w), every sampler; w = 0 is the conditional
  model; bad w and networks raise ValueError; the command line end to end.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import assert_one_line_exit_2
from test_guidance import CLASSES, SEED, N, library_images, tiny_unet
from test_sample import MixtureEps

import guidance as G
import model as M
import sample as SM
import schedule as S
import train
from presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

# A 2-D mixture of three class-conditional Gaussians with a shared, correlated Σ (equal priors).
MEANS = [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]
COV = [[0.3, 0.1], [0.1, 0.2]]
F64 = torch.float64


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def gft_net(seed=0, **change):
    """The digits U-Net with the strength input, random weights, train mode."""
    return tiny_unet(seed, strength_input=True, **change).train().requires_grad_(True)


# ---------------------------------------------------------------- the minimiser on a Gaussian toy


def conditional_eps_mean(z, logsnr, means, cov):
    """E[ε | z_λ, k] per class and the mixture's E[ε | z_λ], float64: Cov(ε, z) = σ I,
    Var(z) = α² Σ + σ² I, E[ε | z, k] = σ Var(z)⁻¹ (z − α m_k); p(k | z) by scipy."""
    alpha, sigma = math.sqrt(sigmoid(logsnr)), math.sqrt(sigmoid(-logsnr))
    var_z = alpha ** 2 * np.asarray(cov) + sigma ** 2 * np.eye(2)
    per_class = np.stack([sigma * np.linalg.solve(var_z, z - alpha * np.asarray(m))
                          for m in means])  # (K, 2)
    log_p = np.array([scipy.stats.multivariate_normal(alpha * np.asarray(m), var_z).logpdf(z)
                      for m in means])
    weights = np.exp(log_p - log_p.max())
    return per_class, (weights / weights.sum()) @ per_class


def importance_eps_mean(z, logsnr, means, cov, n=400_000, seed=0):
    """The same without Gaussian algebra: ε ~ N(0, I) weighted by the density of x = (z − σ ε)/α
    under x | k. Estimates and standard errors: class rows, then the mixture."""
    alpha, sigma = math.sqrt(sigmoid(logsnr)), math.sqrt(sigmoid(-logsnr))
    eps = np.random.default_rng(seed).standard_normal((n, 2))
    x = (z - sigma * eps) / alpha
    weights = np.stack([scipy.stats.multivariate_normal(m, cov).pdf(x) for m in means])  # (K, n)
    weights = np.concatenate([weights, weights.sum(0, keepdims=True)])  # (K + 1, n)
    mean = weights @ eps / weights.sum(1, keepdims=True)  # (K + 1, 2)
    sq = np.stack([w ** 2 @ (eps - m) ** 2 for w, m in zip(weights, mean)])
    return mean, np.sqrt(sq) / weights.sum(1, keepdims=True)


@pytest.mark.parametrize("logsnr", [-1.0, 0.5, 3.0])
def test_the_pointwise_minimiser_is_the_cfg_combination(logsnr):
    """ε_s = (E[ε | z, c] − (1 − β) ε*(z, ∅))/β, E[ε | z, c] in closed form (and by importance
    sampling, within its error), is (1 + w) ε*(z, c) − w ε*(z, ∅) at w = 1/β − 1."""
    exact = MixtureEps(MEANS, COV)
    z = np.array([[0.3, -0.4], [1.2, 0.9], [-0.8, -1.1]])
    labels = torch.tensor([0, 1, 2])
    eps_c = exact(torch.from_numpy(z), logsnr, labels).numpy()
    eps_u = exact(torch.from_numpy(z), logsnr, torch.full((3,), exact.null_label)).numpy()
    for i in range(3):
        per_class, mixture = conditional_eps_mean(z[i], logsnr, MEANS, COV)
        mc, se = importance_eps_mean(z[i], logsnr, MEANS, COV)
        assert (np.abs(mc - np.concatenate([per_class, mixture[None]])) < 5 * se + 1e-12).all()
        for beta in (1.0, 0.5, 0.2, 0.05):
            w = 1 / beta - 1
            # where β ε_s + (1 − β) ε*(z, ∅) = E[ε | z, c]
            minimiser = (per_class[i] - (1 - beta) * mixture) / beta
            cfg = (1 + w) * eps_c[i] - w * eps_u[i]
            np.testing.assert_allclose(minimiser, cfg, rtol=0, atol=1e-10 / beta)
            mc_minimiser = (mc[i] - (1 - beta) * mc[-1]) / beta
            tolerance = 5 * (se[i] + (1 - beta) * se[-1]) / beta + 1e-12
            assert (np.abs(mc_minimiser - cfg) < tolerance).all()
    assert np.abs(eps_c - eps_u).max() > 0.05  # guidance moves ε here, so the check can fail


class FeatureEps(torch.nn.Module):
    """ε_s(z, ∅, 1) = θ_u · [ε*(z, ∅), z], ε_s(z, c, β) = θ_s · [ε*(z, c), ε*(z, ∅), ε*(z, c)/β,
    ε*(z, ∅)/β]: CFG is θ_u = (1, 0), θ_s = (0, 1, 1, −1); wrong answers too (θ_s = e_1)."""

    strength_input = True
    TRUTH = (1.0, 0.0, 0.0, 1.0, 1.0, -1.0)  # (θ_u, θ_s)

    def __init__(self, means, cov):
        super().__init__()
        self.exact = MixtureEps(means, cov)
        self.null_label = self.exact.null_label
        self.theta_u = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        self.theta_s = torch.nn.Parameter(torch.zeros(4, dtype=F64))

    def forward(self, z, logsnr, labels, strength=None):
        beta = 1.0 if strength is None else strength
        beta = torch.as_tensor(beta, dtype=z.dtype).expand(len(z))[:, None]
        eps_c = self.exact(z, logsnr, labels)  # ε*(z, ∅) on the rows with label ∅
        eps_u = self.exact(z, logsnr, torch.full_like(labels, self.null_label))
        uncond = self.theta_u[0] * eps_u + self.theta_u[1] * z
        features = torch.stack([eps_c, eps_u, eps_c / beta, eps_u / beta])  # (4, B, 2)
        sampling = torch.einsum("f,fbd->bd", self.theta_s, features)
        return torch.where((labels == self.null_label)[:, None], uncond, sampling)


def gft_gradient(net, theta, x, labels):
    """∇_θ gft_loss at θ = (θ_u, θ_s) on one fixed draw of ∅, λ, ε and β (seed 1)."""
    with torch.no_grad():
        net.theta_u.copy_(theta[:2])
        net.theta_s.copy_(theta[2:])
    net.zero_grad()
    generator = torch.Generator().manual_seed(1)
    train.gft_loss(net, x, labels, net.null_label, generator=generator).backward()
    return torch.cat([net.theta_u.grad, net.theta_s.grad])


def test_fitting_gft_loss_converges_to_the_cfg_combination():
    """Gradient descent on gft_loss (20,000 mixture points, one fixed draw) ends where the
    gradient, affine in θ (g(θ) = g(0) + J θ), vanishes: θ* = −J⁻¹ g(0). There ε_s is CFG's
    combination at w = 1/β − 1 and ε_s(z, ∅, 1) = ε*(z, ∅), within Monte Carlo tolerance."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (20_000,), generator=g)
    chol = torch.linalg.cholesky(torch.tensor(COV, dtype=F64))
    noise = torch.randn(20_000, 2, generator=g, dtype=F64)
    x = torch.tensor(MEANS, dtype=F64)[labels] + noise @ chol.T
    net = FeatureEps(MEANS, COV)
    g0 = gft_gradient(net, torch.zeros(6, dtype=F64), x, labels)
    J = torch.stack([gft_gradient(net, e, x, labels) - g0 for e in torch.eye(6, dtype=F64)],
                    dim=1)
    theta = torch.linalg.solve(J, -g0)
    # g is affine: θ* is where g = 0, and it attracts gradient descent.
    assert gft_gradient(net, theta, x, labels).abs().max() < 1e-6 * g0.abs().max()
    assert torch.linalg.eigvals(J).real.min() > 0
    np.testing.assert_allclose(theta.numpy(), FeatureEps.TRUTH, atol=0.1)  # wrong ones: 1 away
    # The fitted model against CFG on a grid of z, λ, c and β, relative to the size of ε there.
    grid = torch.linspace(-2, 2, 5, dtype=F64)
    z = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        for logsnr in (-2.0, 0.0, 2.0):
            for c in range(3):
                c = torch.full((len(z),), c)
                null = torch.full_like(c, net.null_label)
                eps_c, eps_u = net.exact(z, logsnr, c), net.exact(z, logsnr, null)
                err = (net(z, logsnr, null) - eps_u).abs().max()
                assert err < 0.06 * eps_u.abs().max()
                for beta in (1.0, 0.5, 0.25):
                    w = 1 / beta - 1
                    cfg = (1 + w) * eps_c - w * eps_u
                    err = (net(z, logsnr, c, strength=beta) - cfg).abs().max()
                    assert err < 0.06 * cfg.abs().max(), (logsnr, beta, err)
                    # The fit tells guidance from none.
                    assert w == 0 or (cfg - eps_c).abs().max() > 5 * err


# ---------------------------------------------------------------- the stop-gradient, passes, draws


def replayed_draws(x, labels, null_label, p_uncond, seed):
    """gft_loss's documented draws, replayed: ∅ uniforms, λ uniforms, ε, β uniforms (β_min = 0)."""
    g = torch.Generator().manual_seed(seed)
    drop_label = torch.rand(len(x), generator=g) < p_uncond
    labels = torch.where(drop_label, null_label, labels)
    u = torch.rand(len(x), generator=g)
    logsnr = S.logsnr_schedule(u).clamp(S.LOGSNR_MIN, S.LOGSNR_MAX)
    eps = torch.randn(x.shape, generator=g)
    beta = torch.rand(len(x), generator=g)
    return drop_label, labels, logsnr, eps, S.q_sample(x, logsnr, eps), beta


def test_the_stop_gradient_stops_the_gradient():
    """grad gft_loss = grad of ‖β ε_s(z, c, β) + (1 − β) U − ε‖², U = ε_s(z, ∅, 1) computed
    apart as a constant; with U differentiable: the same value, another gradient."""
    net, x, labels = gft_net(), torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    params = [p for p in net.parameters()]
    drop_label, labels_in, logsnr, eps, z, beta = replayed_draws(x, labels, net.null_label, 0.4,
                                                                 seed=3)
    assert drop_label.any() and not drop_label.all()  # both kinds of example
    null = torch.full_like(labels, net.null_label)
    const = net(z, logsnr, null, strength=1.0).detach()

    def mixed(uncond):
        eps_s = net(z, logsnr, labels_in, strength=torch.where(drop_label, 1.0, beta))
        b = beta[:, None, None, None]
        return ((b * eps_s + (1 - b) * uncond - eps) ** 2).mean()

    loss = train.gft_loss(net, x, labels, net.null_label, p_uncond=0.4,
                          generator=torch.Generator().manual_seed(3))
    ref = mixed(const)
    no_sg = mixed(net(z, logsnr, null, strength=1.0))
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
    assert torch.allclose(no_sg, ref, rtol=1e-6, atol=0)
    grads, ref_grads, no_sg_grads = (torch.autograd.grad(v, params) for v in (loss, ref, no_sg))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)
    differ = max(((g - n).norm() / n.norm().clamp(min=1e-12)).item()
                 for g, n in zip(grads, no_sg_grads))
    assert differ > 0.05


class Recorder(torch.nn.Module):
    """Passes every call to `net`; records labels, strength, net's mode, gradients on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.null_label, self.calls = net, net.null_label, []

    def forward(self, z, logsnr, labels, strength=None):
        self.calls.append((labels.tolist(), torch.as_tensor(strength).tolist(),
                           self.net.training, torch.is_grad_enabled()))
        return self.net(z, logsnr, labels, strength=strength)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_two_passes_and_the_mode(mode):
    """sg[ε_s(z, ∅, 1)] without gradient or dropout (eval mode), then ε_s(z, c, β) in the
    model's mode with gradient, at the replayed labels and β (1 where c ← ∅); mode restored."""
    net = Recorder(gft_net(dropout=0.1)).train(mode == "train")
    x, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    train.gft_loss(net, x, labels, net.null_label, p_uncond=0.4,
                   generator=torch.Generator().manual_seed(3))
    drop_label, labels_in, _, _, _, beta = replayed_draws(x, labels, net.null_label, 0.4, seed=3)
    (l0, s0, train0, grad0), (l1, s1, train1, grad1) = net.calls
    assert l0 == [net.null_label] * 8 and s0 == [1.0] * 8 and not train0 and not grad0
    assert l1 == labels_in.tolist() and s1 == torch.where(drop_label, 1.0, beta).tolist()
    assert train1 == (mode == "train") and grad1 and net.training == (mode == "train")


def test_beta_one_is_algorithm_1():
    """beta_min = 1 (β ≡ 1): gft_loss is train.diffusion_loss with the same generator, to the
    bit, dropout on (the stop-gradient pass draws no random numbers)."""
    net, x, labels = gft_net(dropout=0.1), torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)

    def loss(loss_fn, **kwargs):
        torch.manual_seed(7)  # dropout's draws
        return loss_fn(net, x, labels, net.null_label, 0.3,
                       generator=torch.Generator().manual_seed(5), **kwargs)

    expected = loss(train.diffusion_loss)
    assert torch.equal(loss(train.gft_loss, beta_min=1.0), expected)
    assert not torch.equal(loss(train.gft_loss), expected)


@pytest.mark.parametrize("beta_min", [0.0, 0.2])
def test_beta_is_uniform_on_its_range(beta_min):
    beta = train.sample_beta(20_000, beta_min, torch.Generator().manual_seed(0))
    assert beta.shape == (20_000,) and beta_min <= beta.min() and beta.max() < 1
    ks = scipy.stats.kstest(beta.double().numpy(), "uniform", args=(beta_min, 1 - beta_min))
    assert ks.pvalue > 1e-3
    assert train.BETA_RANGE == (0.0, 1.0)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="outside"):
            train.sample_beta(3, bad)


# ---------------------------------------------------------------- off: the network as before


def unet_inputs(config, B=4):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(B, config.in_channels, config.image_size, config.image_size, generator=g)
    return z, torch.linspace(-8, 8, B), torch.tensor([0, 3, config.num_classes, 9])[:B]


def test_off_checkpoint_round_trip_and_on_starts_as_off(tmp_path):
    """An old config (no field) loads strictly, same outputs; with the option (same seed, last
    layer 0) the outputs at any β are the same; trained, β matters and None is β = 1."""
    torch.manual_seed(0)
    plain = tiny_unet(0)
    z, logsnr, labels = unet_inputs(plain.config)
    config = dataclasses.asdict(plain.config)
    del config["strength_input"]
    M.save_checkpoint({"config": config, "ema": plain.state_dict(), "model": plain.state_dict(),
                       "step": 0}, str(tmp_path / "old.pt"))
    loaded, _ = M.load_model(str(tmp_path / "old.pt"))
    assert not loaded.strength_input
    assert not any(k.startswith("strength") for k in loaded.state_dict())
    assert torch.equal(loaded(z, logsnr, labels), plain(z, logsnr, labels))
    with pytest.raises(ValueError, match="no strength input"):
        plain(z, logsnr, labels, strength=0.5)

    torch.manual_seed(0)
    off = M.UNet(PRESETS["digits"].network).eval()
    torch.manual_seed(0)
    on = M.UNet(dataclasses.replace(PRESETS["digits"].network, strength_input=True)).eval()
    on_state = on.state_dict()
    assert all(torch.equal(on_state[k], v) for k, v in off.state_dict().items())
    assert sorted(set(on_state) - set(off.state_dict())) == [
        f"strength_mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    with torch.no_grad():
        for p in off.parameters():  # random weights in both, zero-initialised layers too
            p.normal_(0, 0.1)
        on.load_state_dict({**on_state, **off.state_dict()})
        for strength in (None, 1.0, 0.3, torch.tensor([0.1, 0.5, 1.0, 0.9])):
            assert torch.equal(on(z, logsnr, labels, strength=strength), off(z, logsnr, labels))
        on.strength_mlp[2].weight.normal_(0, 0.1)
        assert torch.equal(on(z, logsnr, labels), on(z, logsnr, labels, strength=1.0))
        assert (on(z, logsnr, labels, strength=0.3) - on(z, logsnr, labels)).abs().max() > 1e-3


# ---------------------------------------------------------------- the rule


class StrengthStub(torch.nn.Module):
    """ε_s(z, λ, c, β) = c + β z: a closed form, recording each call's batch size and β."""

    null_label, strength_input = 7, True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, logsnr, labels, strength=None):
        beta = torch.as_tensor(strength, dtype=z.dtype).expand(len(z))
        self.calls.append((len(z), beta.tolist()))
        return labels.to(z.dtype)[:, None] + beta[:, None] * z


@pytest.mark.parametrize("sampler", list(SM.SAMPLERS))
def test_one_evaluation_per_step_at_beta_one_over_one_plus_w(sampler):
    stub, labels = StrengthStub(), torch.tensor([1, 2, 3])
    for w in (1.5, torch.tensor([0.0, 1.0, 3.0])):
        # β as the stub sees it, in z's dtype
        beta = (1 / (1 + torch.as_tensor(w, dtype=F64))).float().expand(3)
        stub.calls = []
        z = torch.randn(3, 2)
        eps = G.guidance_free_eps(stub, z, torch.zeros(3), labels, w)
        assert stub.calls == [(3, beta.tolist())]
        assert torch.equal(eps, labels[:, None] + beta[:, None] * z)
        beta, stub.calls = beta.tolist(), []
        SM.sample(stub, labels, w, steps=5, sampler=sampler, guidance=G.RULES["guidance-free"],
                  shape=(2,), clip_x=False, generator=torch.Generator().manual_seed(0))
        assert stub.calls == [(3, beta)] * 5


def test_w0_gives_the_conditional_models_samples_exactly_with_every_sampler():
    """On the U-Net with the strength input: w = 0 is ε_s(z, c, 1), the network called without
    a strength, so the samples are the paper's rule's at w = 0; w > 0 changes them; the rule
    is one call at β = 1/(1 + w)."""
    net = gft_net().eval().requires_grad_(False)
    labels = torch.tensor([1, 7, 3])
    for sampler in SM.SAMPLERS:
        def run(rule, w):
            return SM.sample(net, labels, w, steps=4, sampler=sampler, guidance=rule,
                             generator=torch.Generator().manual_seed(0))
        cond = run(G.guided_eps, 0.0)
        assert torch.equal(run(G.guidance_free_eps, 0.0), cond), sampler
        assert torch.equal(run(G.guidance_free_eps, torch.zeros(3)), cond), sampler
        assert (run(G.guidance_free_eps, 2.0) - cond).abs().max() > 1e-3, sampler
    z, logsnr = torch.randn(3, 1, 8, 8), torch.tensor([-3.0, 0.0, 4.0])
    w = torch.tensor([0.0, 0.5, 4.0])
    assert torch.equal(G.guidance_free_eps(net, z, logsnr, labels, w),
                       net(z, logsnr, labels, strength=1 / (1 + w)))


def test_bad_w_and_a_network_without_the_strength_input_raise():
    net, z, labels = StrengthStub(), torch.zeros(3, 2), torch.tensor([1, 2, 3])
    for bad in (-0.5, torch.tensor([0.0, -1.0, 2.0]), math.nan):
        with pytest.raises(ValueError, match=r"w >= 0") as info:
            G.guidance_free_eps(net, z, torch.zeros(3), labels, bad)
        assert "\n" not in str(info.value)
    for plain in (tiny_unet(0), torch.nn.Identity()):
        with pytest.raises(ValueError, match="no strength input"):
            G.guidance_free_eps(plain, torch.zeros(3, 1, 8, 8), torch.zeros(3), labels, 1.0)
    with pytest.raises(ValueError, match="no strength input"):
        SM.sample(tiny_unet(0), labels, 1.0, steps=2, guidance=G.guidance_free_eps)


@pytest.fixture(scope="module")
def gft_ckpts(tmp_path_factory):
    """main.pt: a digits U-Net with the strength input (its config says so); plain.pt: without."""
    d = tmp_path_factory.mktemp("gft_ckpts")
    for name, net in (("main.pt", gft_net()), ("plain.pt", tiny_unet(0))):
        state = net.state_dict()
        M.save_checkpoint({"model": state, "ema": state, "step": 0, "args": {"dataset": "digits"},
                           "config": dataclasses.asdict(net.config)}, str(d / name))
    return d


def test_cli_guidance_free_end_to_end(gft_ckpts, tmp_path):
    """sample.py rebuilds the strength input from the checkpoint alone; the npz holds the
    library call's images with the same per-image seeds."""
    SM.main(["--ckpt", f"{gft_ckpts}/main.pt", "--classes", ",".join(map(str, CLASSES)),
             "--n-per-class", str(N), "--steps", "3", "--seed", str(SEED), "--sampler", "dpmpp2m",
             "--guidance", "guidance-free", "--w", "0", "2", "--out", str(tmp_path / "a.png"),
             "--npz", str(tmp_path / "a.npz")])
    images = np.load(tmp_path / "a.npz")["images"]
    ref = library_images(gft_ckpts, lambda: G.guidance_free_eps, [0.0, 2.0], "dpmpp2m")
    assert np.array_equal(images, ref)
    half = len(images) // 2
    assert np.abs(images[:half].astype(int) - images[half:]).max() > 0  # w mattered


@pytest.mark.parametrize("ckpt,w,word", [("plain.pt", "1", "no strength input"),
                                         ("main.pt", "-1", "w >= 0")])
def test_cli_bad_input_exits_2_with_one_line(gft_ckpts, tmp_path, capsys, ckpt, w, word):
    argv = ["--ckpt", f"{gft_ckpts}/{ckpt}", "--guidance", "guidance-free", "--w", w,
            "--steps", "2", "--out", str(tmp_path / "s.png")]
    err = assert_one_line_exit_2(SM.main, argv, capsys, "sample.py: error:")
    assert word in err, err


@pytest.mark.slow
def test_train_py_switch_trains_a_network_that_samples_at_one_evaluation(tmp_path):
    """train.py --guidance-free: the checkpoint's config has the strength input, its losses
    are finite, sample.py samples it with --guidance guidance-free from the checkpoint alone;
    the preview grid uses that rule too. Without the switch: the paper's network."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--dataset", "digits", "--batch-size", "8", "--max-steps", "3", "--log-every", "1",
              "--warmup-steps", "1", "--sample-every", "3", "--sample-steps", "2"]
    for flag, out in ((["--guidance-free"], tmp_path / "gft"), ([], tmp_path / "plain")):
        proc = subprocess.run([sys.executable, "train.py", *common, *flag, "--out-dir", str(out)],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert (out / "samples_0000003.png").exists(), proc.stderr  # the preview grid was drawn
        ckpt = M.load_checkpoint(str(out / "ckpt.pt"))
        assert ckpt["config"].get("strength_input", False) == bool(flag)
        assert ckpt["args"]["guidance_free"] == bool(flag)
        assert torch.isfinite(ckpt["losses"]).all()
    net = M.model_from_checkpoint(M.load_checkpoint(str(tmp_path / "gft" / "ckpt.pt")))
    assert net.strength_input
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "gft" / "ckpt.pt"),
                           "--guidance", "guidance-free", "--w", "0", "2", "--n-per-class", "1",
                           "--steps", "2", "--out", str(tmp_path / "s.png")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "s.png").exists(), proc.stderr


def test_bench_times_the_guidance_free_step_at_one_more_forward_pass_and_samples_at_one_evaluation(
        tmp_path):
    """bench.py --guidance-free: training costs Algorithm 1's FLOPs plus a forward pass, about
    (3F + F)/3F = 4/3 (a forward F, a backward 2F; a little more: the first layer has no input
    gradient); sampling at w = 1 evaluates the network once per step, CFG twice."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--presets", "digits", "--guidance-free", "--iters", "1", "--min-seconds", "0",
                "--sample-iters", "1", "--sample-batch-size", "4", "--matmul-sizes", "64",
                "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {r["loss"]: r for r in report["train"]}
    assert set(rows) == {"Algorithm 1", "guidance-free"}
    ratio = rows["guidance-free"]["flops_per_step"] / rows["Algorithm 1"]["flops_per_step"]
    assert 1.30 < ratio < 1.40, ratio
    (sampled,) = report["sample"]
    keys = ("w0", "w1_one_batch", "w1_two_passes", "w1_guidance_free")
    evals = {key: sampled[f"{key}_evals_per_step"] for key in keys}
    assert evals == {"w0": 1.0, "w1_one_batch": 2.0, "w1_two_passes": 2.0, "w1_guidance_free": 1.0}
    guided = sampled[f"w1_{sampled['guided_way']}_seconds_best"]
    assert sampled["guidance_free_vs_guided"] == pytest.approx(
        sampled["w1_guidance_free_seconds_best"] / guided)

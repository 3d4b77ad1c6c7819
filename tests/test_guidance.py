"""guidance.py's rules against independent references (classifier guidance:
test_noisy_classifier.py; every rule on every sampler: test_lift_out.py). The paper's rule against
separate network calls; each later rule against its published formula in float64 numpy on
a stand-in network with random per-label weights (TableEps). Network calls counted; w = 0
is the conditional model for all but CFG++. The command line for each rule (the library's
images, same seeds) and a table of bad inputs.
"""
import dataclasses
import functools
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_exit_2
from matplotlib.image import imread
from test_sample import ONE_THREAD, REPO, close, draw, logsnr_grid, tiny_unet

import guidance as G
import model as M
import sample as SM

pytestmark = pytest.mark.usefixtures("one_thread")


class TableEps(torch.nn.Module):
    """A float64 ε_θ(z, λ, c) = tanh(a_c ⊙ z + b_c + λ/10), random a_c, b_c per label (∅ = K,
    last): every label gives a different ε. Records each call's batch size and labels."""

    def __init__(self, shape=(2, 3, 3), num_classes=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(num_classes + 1, *shape, generator=g, dtype=torch.float64)
        self.b = torch.randn(num_classes + 1, *shape, generator=g, dtype=torch.float64)
        self.null_label, self.calls = num_classes, []

    def forward(self, z, logsnr, labels):
        self.calls.append((len(z), labels.tolist()))
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64).expand(len(z)).reshape(-1, 1, 1, 1)
        return torch.tanh(self.a[labels] * z.double() + self.b[labels] + logsnr / 10).to(z.dtype)


def inputs(B=5, seed=1, logsnr=(-4.0, -1.0, 0.5, 2.0, 6.0)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    return z, torch.tensor(logsnr[:B], dtype=torch.float64), torch.arange(B) % 4


def evals(net, z, logsnr, labels):
    """ε_c and ε_∅ as float64 numpy from two separate calls, and α, σ of λ by definition."""
    eps_c = net(z, logsnr, labels).numpy()
    eps_u = net(z, logsnr, torch.full_like(labels, net.null_label)).numpy()
    lam = logsnr.numpy().reshape(-1, 1, 1, 1)
    return eps_c, eps_u, np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


W = torch.tensor([0.0, 0.5, 1.0, 3.0, -1.0], dtype=torch.float64)  # per example; 0 and −1 too
Wn = W.numpy().reshape(-1, 1, 1, 1)


# ---------------- the paper's rule: guided_eps

def test_guided_eps_equals_two_separate_evaluations():
    """w = 0 is the conditional pass itself, w = −1 the unconditional model; per-example and
    scalar w against (1 + w) ε_c − w ε_u in float64 from two separate calls."""
    unet = tiny_unet(0)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logsnr, labels = torch.linspace(-6, 6, 6), torch.arange(6) % 10
    eps_cond = unet(z, logsnr, labels)
    eps_uncond = unet(z, logsnr, torch.full_like(labels, unet.null_label))
    assert (eps_cond - eps_uncond).abs().max() > 1e-2  # the label matters: the test can fail
    assert torch.equal(G.guided_eps(unet, z, logsnr, labels, 0.0), eps_cond)  # one pass
    eps = G.guided_eps(unet, z, logsnr, labels, -1.0)
    assert torch.allclose(eps, eps_uncond, rtol=0, atol=1e-6)
    for w in (torch.tensor([0.0, -1.0, 0.3, 1.0, 4.0, -2.5]), 2.0):
        w64 = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1, 1, 1)
        ref = (1 + w64) * eps_cond.double() - w64 * eps_uncond.double()
        eps = G.guided_eps(unet, z, logsnr, labels, w).double()
        assert torch.allclose(eps, ref, rtol=0, atol=1e-5)


class RecordingStub(torch.nn.Module):
    """ε(z, λ, c) = c + z: a closed form, and a record of each call's batch size and labels."""
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
    """w = 0: one pass of B; guided: one batch of 2B or two passes of B (guidance.ONE_BATCH
    for the device), the same ε̃ either way."""
    monkeypatch.setitem(G.ONE_BATCH, "cpu", one_batch)
    stub, z, labels = RecordingStub(), torch.zeros(3, 2), torch.tensor([1, 2, 3])
    guided = [(6, [1, 2, 3, 7, 7, 7])] if one_batch else [(3, [1, 2, 3]), (3, [7, 7, 7])]
    for w, calls in [(0.0, [(3, [1, 2, 3])]), (torch.zeros(3), [(3, [1, 2, 3])]),
                     (2.0, guided), (torch.tensor([0.0, 1.0, 0.0]), guided)]:
        stub.calls = []
        eps = G.guided_eps(stub, z, torch.zeros(3), labels, w)
        w = torch.as_tensor(w).reshape(-1, 1)
        assert stub.calls == calls
        assert torch.equal(eps, (1 + w) * labels[:, None] - w * 7 + 0 * z)
    # The whole sampler, every step: T steps of one B pass or the guided calls; progress(t, T).
    for sampler in SM.SAMPLERS:
        for w, sizes in [(0.0, [3]), (1.5, [n for n, _ in guided])]:
            stub.calls, seen = [], []
            SM.sample(stub, labels, w, steps=5, sampler=sampler, shape=(2,), clip_x=False,
                      progress=lambda t, T: seen.append((t, T)))
            assert [n for n, _ in stub.calls] == sizes * 5
            assert seen == [(t, 5) for t in range(1, 6)]


def test_a_guidance_rule_plugs_into_every_sampler():
    """sample() calls its rule once per step with (model, z, λ_t, labels, w, state), one
    state per run, at the spacing's λ_t, and uses ε̃ as line 4 does."""
    for sampler in SM.SAMPLERS:
        for spacing in ("cosine", "uniform"):
            seen, states = [], []
            def rule(model, z, logsnr, labels, w, state):
                seen.append((model, logsnr.tolist(), labels.tolist(), w))
                states.append(state)
                return torch.zeros_like(z)  # ε̃ = 0: x̃ = z / α
            x = SM.sample("the model", torch.tensor([4, 2]), 0.5, steps=6, sampler=sampler,
                          spacing=spacing, guidance=rule, shape=(3,), clip_x=False,
                          generator=torch.Generator().manual_seed(0))
            grid = SM.logsnr_steps(6, spacing)[:, None].expand(6, 2).numpy()
            assert [m for m, _, _, _ in seen] == ["the model"] * 6
            assert all(w == 0.5 for *_, w in seen) and all(c == [4, 2] for _, _, c, _ in seen)
            assert np.allclose([lam for _, lam, _, _ in seen], grid, atol=1e-5)
            assert x.shape == (2, 3) and torch.isfinite(x).all()
            assert states[0] == {} and all(state is states[0] for state in states)


# ---------------- each rule against its formula

def test_interval_against_its_formula_in_one_batch_or_one_pass(monkeypatch):
    monkeypatch.setitem(G.ONE_BATCH, "cpu", True)  # the paper's 2B batch (by device: test_sample)
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    lo, hi = -1.0, 2.0  # rows 1, 2, 3 inside (the ends included), rows 0 and 4 outside
    inside = ((lo <= logsnr.numpy()) & (logsnr.numpy() <= hi)).reshape(-1, 1, 1, 1)
    net.calls = []
    got = G.interval_guided_eps(net, z, logsnr, labels, W, logsnr_lo=lo, logsnr_hi=hi)
    close(got, np.where(inside, (1 + Wn) * eps_c - Wn * eps_u, eps_c))
    assert net.calls == [(10, labels.tolist() + [4] * 5)]  # one batch of 2B
    net.calls = []  # no row inside: ε_θ(z, c) in one pass of B, ∅ never runs
    got = G.interval_guided_eps(net, z, logsnr, labels, 3.0, logsnr_lo=10.0, logsnr_hi=12.0)
    assert torch.equal(got, net(z, logsnr, labels)) and net.calls[0] == (5, labels.tolist())


@pytest.mark.parametrize("sampler", list(SM.SAMPLERS))
def test_interval_rule_calls_the_network_once_per_step_outside_the_interval(sampler, monkeypatch):
    """The whole sampler: at each λ_t (the schedule in numpy) one pass of B outside
    [λ_lo, λ_hi], one batch of 2B inside; the interval splits the grid of either spacing."""
    monkeypatch.setitem(G.ONE_BATCH, "cpu", True)
    net, T, B = TableEps(), 16, 3
    spacing = SM.SAMPLERS[sampler]["spacing"]
    grid = logsnr_grid(T) if spacing == "cosine" else np.linspace(-20, 20, T)
    rule = functools.partial(G.interval_guided_eps, logsnr_lo=-3.0, logsnr_hi=4.0)
    draw(net, torch.tensor([0, 1, 2]), 2.0, steps=T, sampler=sampler, guidance=rule,
         shape=(2, 3, 3))
    expected = [2 * B if -3.0 <= lam <= 4.0 else B for lam in grid]
    assert [n for n, _ in net.calls] == expected and 0 < expected.count(2 * B) < T


def test_autoguidance_against_its_formula():
    """(1 + w) ε_good(z, c) − w ε_bad(z, c), the bad model called with c (never ∅), once each."""
    good, bad, (z, logsnr, labels) = TableEps(seed=0), TableEps(seed=7), inputs()
    eps_good, eps_bad = good(z, logsnr, labels).numpy(), bad(z, logsnr, labels).numpy()
    good.calls, bad.calls = [], []
    close(G.autoguided_eps(good, z, logsnr, labels, W, guide=bad),
          (1 + Wn) * eps_good - Wn * eps_bad)
    assert good.calls == bad.calls == [(5, labels.tolist())]
    eps_null = good(z, logsnr, torch.full_like(labels, 4)).numpy()
    assert np.abs(eps_bad - eps_null).max() > 0.1  # bad ≠ ∅


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_against_its_formula_on_v(phi):
    """Lin et al. on v, from the definitions: x̂ = (z − σ ε)/α, v = α ε − σ x̂, v_cfg =
    (1 + w) v_c − w v_∅, v̂ = φ v_cfg std(v_c)/std(v_cfg) + (1 − φ) v_cfg, back to ε̃."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, alpha, sigma = evals(net, z, logsnr, labels)
    zn = z.numpy()
    def v(eps):
        return alpha * eps - sigma * (zn - sigma * eps) / alpha
    def std(a):  # over one sample's C, H, W
        return a.reshape(len(a), -1).std(axis=1).reshape(-1, 1, 1, 1)
    v_cfg = (1 + Wn) * v(eps_c) - Wn * v(eps_u)
    v_hat = phi * v_cfg * std(v(eps_c)) / std(v_cfg) + (1 - phi) * v_cfg
    x_hat = alpha * zn - sigma * v_hat  # solves z = α x̂ + σ ε, v̂ = α ε − σ x̂ (α² + σ² = 1)
    got = G.rescaled_guided_eps(net, z, logsnr, labels, W, phi=phi)
    close(got, (zn - alpha * x_hat) / sigma, 1e-9)
    if phi == 0.0:
        close(got, ((1 + Wn) * eps_c - Wn * eps_u), 1e-9)  # φ = 0 is CFG
    if phi == 1.0:  # the rescaled v has the conditional one's std
        close(std(v(got.numpy())), std(v(eps_c)), 1e-9)


def apg_reference(calls, eta, r, beta, w):
    """Sadat et al.'s Algorithm 1 in numpy over a run: calls = [(ε_c, ε_∅, z, α, σ)]."""
    running, out = 0.0, []
    for eps_c, eps_u, z, alpha, sigma in calls:
        x_c, x_u = (z - sigma * eps_c) / alpha, (z - sigma * eps_u) / alpha
        running = (x_c - x_u) + beta * running
        norm = np.sqrt((running ** 2).reshape(len(z), -1).sum(1)).reshape(-1, 1, 1, 1)
        d = running * np.minimum(1.0, r / norm)
        coef = (d * x_c).reshape(len(z), -1).sum(1) / (x_c * x_c).reshape(len(z), -1).sum(1)
        parallel = coef.reshape(-1, 1, 1, 1) * x_c
        x = x_c + w * ((d - parallel) + eta * parallel)
        out.append((z - alpha * x) / sigma)
    return out


def test_apg_against_its_formula_over_a_run():
    """Four calls at increasing λ, a new z each: momentum, norm threshold (r cuts some rows
    and not others) and projection against the numpy reference; η = 1, r = inf, β = 0: CFG."""
    net, eta, beta = TableEps(), 0.3, -0.5
    steps = [inputs(seed=k, logsnr=tuple(lam + 0.5 * k for lam in (-3.0, -1.0, 0.0, 1.0, 3.0)))
             for k in range(4)]
    first = evals(net, *steps[0])
    x_c, x_u = ((steps[0][0].numpy() - first[3] * e) / first[2] for e in first[:2])
    norms = np.sqrt(((x_c - x_u) ** 2).reshape(5, -1).sum(1))
    r = float(np.median(norms))  # about half the rows are cut at the first step
    assert (norms > r).any() and (norms < r).any()
    calls = [(*evals(net, *s)[:2], s[0].numpy(), *evals(net, *s)[2:]) for s in steps]
    state = {}  # one run's
    for (z, logsnr, labels), eps_ref in zip(steps, apg_reference(calls, eta, r, beta, Wn)):
        close(G.apg_eps(net, z, logsnr, labels, W, state, eta=eta, r=r, beta=beta), eps_ref, 1e-9)
    z, logsnr, labels = steps[0]
    close(G.apg_eps(net, z, logsnr, labels, W, {}, eta=1.0, r=math.inf, beta=0.0),
          G.guided_eps(net, z, logsnr, labels, W).numpy(), 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apg_parts_are_orthogonal_and_sum_to_the_difference(dtype):
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    x_cond = (torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    par, orth, x = (a.double().reshape(6, -1) for a in (*G.apg_project(diff, x_cond), x_cond))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (par + orth - diff.double().reshape(6, -1)).abs().max() <= tol * 10
    cos = (orth * x).sum(1) / (orth.norm(dim=1) * x.norm(dim=1))
    assert cos.abs().max() <= tol  # Δ⊥ ⟂ x̂_c
    coef = (par * x).sum(1, keepdim=True) / (x ** 2).sum(1, keepdim=True)
    assert (par - coef * x).abs().max() <= tol  # Δ∥ is a multiple of x̂_c
    assert orth.norm(dim=1).min() > 1 and par.norm(dim=1).min() > 0.1  # both parts there


def test_apg_momentum_belongs_to_one_run():
    """sample() gives the rule a fresh state per run: the same bound APG twice gives the same
    images, not those of APG without momentum (so it was carried from step to step)."""
    net, labels = TableEps(), torch.tensor([0, 1])
    run = functools.partial(draw, net, labels, 2.0, steps=4, sampler="ddim", shape=(2, 3, 3))
    first = run(guidance=functools.partial(G.apg_eps, r=math.inf))
    assert torch.equal(run(guidance=functools.partial(G.apg_eps, r=math.inf)), first)
    no_momentum = run(guidance=functools.partial(G.apg_eps, r=math.inf, beta=0.0))
    assert (no_momentum - first).abs().max() > 1e-3
    z, logsnr, labels = inputs()
    with pytest.raises(ValueError, match="state"):
        G.apg_eps(net, z, logsnr, labels, 2.0)


PARAMS_BAD = [  # (rule, its keywords, a word of the ValueError): the rule's own check
    (G.interval_guided_eps, dict(logsnr_lo=3.0, logsnr_hi=1.0), "logsnr_lo < logsnr_hi"),
    (G.interval_guided_eps, dict(logsnr_lo=0.0, logsnr_hi=math.nan), "finite"),
    (G.rescaled_guided_eps, dict(phi=1.5), "[0, 1]"),
    (G.rescaled_guided_eps, dict(phi=math.nan), "[0, 1]"),
    (G.apg_eps, dict(eta=5.0), "[0, 1]"),
    (G.apg_eps, dict(r=0.0), "positive"),
    (G.apg_eps, dict(r=math.nan), "positive"),
    (G.apg_eps, dict(beta=1.0), "(-1, 1)"),
    (G.classifier_guided_eps, dict(classifier=None, base="both"), "unknown base"),
    (G.cfgpp_eps, dict(w=0.5), "in [-1, 0]"),  # CFG++'s γ = 1 + w outside [0, 1]
    (G.cfgpp_eps, dict(w=torch.tensor([-0.5, -1.5, 0.0, 0.0, 0.0])), "in [-1, 0]"),
]


@pytest.mark.parametrize("rule,params,word", PARAMS_BAD,
                         ids=[f"{r.__name__} {p}" for r, p, _ in PARAMS_BAD])
def test_each_rule_checks_its_own_parameters(rule, params, word):
    net, (z, logsnr, labels) = TableEps(), inputs()
    with pytest.raises(ValueError, match=re.escape(word)):
        rule(net, z, logsnr, labels, **{"w": 2.0, "state": {}, **params})


def test_cfgpp_pair_against_its_formula():
    """CFG++'s ε̂ = ε_∅ + γ (ε_c − ε_∅), γ = 1 + w, for x̃, and ε_∅ to re-noise with."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    w = torch.tensor([0.0, -0.2, -0.5, -0.8, -1.0], dtype=torch.float64)  # γ = 1 + w in [0, 1]
    eps_x, eps_renoise = G.cfgpp_eps(net, z, logsnr, labels, w)
    close(eps_x, eps_u + (1 + w.numpy().reshape(-1, 1, 1, 1)) * (eps_c - eps_u))
    close(eps_renoise, eps_u)


def test_cfgpp_is_the_ddim_recursion_of_the_paper(float64_default):
    """sample() with cfgpp_eps against CFG++'s DDIM in numpy: x̃_t = (z_t − σ_t ε̂_γ)/α_t,
    z_{t+1} = α_{t+1} x̃_t + σ_{t+1} ε_∅(z_t), the last x̃ returned; γ = 0.6, unclipped."""
    net, labels, T, gamma = TableEps(), torch.tensor([0, 1, 2]), 10, 0.6
    x = draw(net, labels, gamma - 1, 5, steps=T, sampler="ddim", guidance=G.cfgpp_eps,
             clip_x=False, shape=(2, 3, 3))
    z = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(5))  # sample()'s z_1
    lam = logsnr_grid(T)
    for t in range(T):
        eps_c, eps_u, alpha, sigma = evals(net, z, torch.full((3,), lam[t]), labels)
        x_ref = (z.numpy() - sigma * (eps_u + gamma * (eps_c - eps_u))) / alpha
        if t < T - 1:
            a_next, s_next = (math.sqrt(1 / (1 + math.exp(s * lam[t + 1]))) for s in (-1, 1))
            z = torch.from_numpy(a_next * x_ref + s_next * eps_u)
    close(x, x_ref, 1e-9)


def test_cfgpp_at_gamma_0_is_ddim_on_the_unconditional_model(float64_default):
    """γ = 0 (w = −1): CFG++ through sample() is the paper's rule at w = −1 (unconditional)
    with the plain DDIM step, either spacing. At γ = 1 (w = 0) it is not conditional DDIM."""
    net, labels = TableEps(), torch.tensor([0, 1, 2, 3])
    for spacing in ("cosine", "uniform"):
        run = functools.partial(draw, net, labels, seed=2, steps=12, sampler="ddim",
                                spacing=spacing, clip_x=False, shape=(2, 3, 3))
        close(run(-1.0, guidance=G.cfgpp_eps), run(-1.0, guidance=G.guided_eps).numpy(), 1e-9)
        assert (run(0.0, guidance=G.cfgpp_eps) - run(0.0, guidance=G.guided_eps)).abs().max() > 1e-2


def test_cfgpp_gamma_0_on_the_unet():
    """The same on the U-Net in float32 (a tolerance for its rounding), unclipped: the fixed
    clip changes DDIM's ε̂ = (z − α x̃)/σ where x̃ leaves [−1, 1], not CFG++'s ε_∅."""
    run = functools.partial(draw, tiny_unet(0), torch.tensor([1, 5, 9]), -1.0, 4, steps=6,
                            sampler="ddim", clip_x=False)
    x_cfgpp, x_ddim = run(guidance=G.cfgpp_eps), run(guidance=G.guided_eps)  # |x̃| up to 1e5
    assert (x_cfgpp - x_ddim).abs().max() <= 1e-5 * x_ddim.abs().max()


def test_w0_every_rule_is_the_conditional_model():
    """At w = 0 (a number or zeros per example) each rule returns ε_θ(z, c) from one pass of
    B, and through every sampler the samples are the conditional model's. CFG++ is the
    exception the paper implies: x̃ from ε_θ(z, c), re-noised with ε_θ(z, ∅)."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    rules = {"interval": functools.partial(G.interval_guided_eps, logsnr_lo=-10.0, logsnr_hi=10.0),
             "autoguidance": functools.partial(G.autoguided_eps, guide=TableEps(seed=7)),
             "rescale": G.rescaled_guided_eps, "apg": G.apg_eps}
    eps_c = net(z, logsnr, labels)
    for name, rule in rules.items():
        for w in (0.0, torch.zeros(5, dtype=torch.float64)):
            net.calls = []
            got = rule(net, z, logsnr, labels, w, {})
            assert torch.equal(got, eps_c) and net.calls == [(5, labels.tolist())], name
        for sampler in SM.SAMPLERS:
            run = functools.partial(draw, net, labels[:3], 0.0, 1, steps=5, sampler=sampler,
                                    shape=(2, 3, 3))
            assert torch.equal(run(guidance=rule), run(guidance=G.guided_eps)), (name, sampler)
        close(rule(net, z, logsnr, labels, W, {})[0], eps_c[0].numpy(), 1e-9)  # a w = 0 row
    eps_x, eps_renoise = G.cfgpp_eps(net, z, logsnr, labels, 0.0)
    assert torch.equal(eps_x, eps_c) and not torch.allclose(eps_renoise, eps_c)


# ---------------- the command line

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A digits checkpoint, a smaller guide of the same data, and guides that do not fit."""
    d = tmp_path_factory.mktemp("guidance_ckpts")

    def write(name, net, dataset="digits", config=(), **extra):
        state, config = net.state_dict(), {**dataclasses.asdict(net.config), **dict(config)}
        M.save_checkpoint({"model": state, "ema": state, "step": 0, "config": config,
                           "args": {"dataset": dataset}, **extra}, str(d / name))
    write("main.pt", tiny_unet(0))
    write("guide.pt", tiny_unet(9, channels=16), step=50)
    write("guide_mnist.pt", tiny_unet(9, channels=16), dataset="mnist")
    write("guide_size.pt", tiny_unet(9, channels=16, image_size=16))
    write("guide_channels.pt", tiny_unet(9, channels=16, in_channels=3))
    write("guide_classes.pt", tiny_unet(9, channels=16, num_classes=5))
    write("guide_unfit.pt", tiny_unet(9, channels=16), config={"channels": 8})  # weights ≠ config
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    return d


CLASSES, N, SEED = (0, 3, 8), 2, 5


def library_images(ckpts, rule_factory, ws, sampler, clip_x=True, steps=3):
    """What main must write: sample() in one batch, image i's generator seeded (SEED, c, j)."""
    unet = M.model_from_checkpoint(M.load_checkpoint(f"{ckpts}/main.pt")).eval()
    grid = [(w, c, j) for w in ws for c in CLASSES for j in range(N)]
    seeds = [int(np.random.SeedSequence([SEED, c, j]).generate_state(1)[0]) for _, c, j in grid]
    labels, ws = torch.tensor([c for _, c, _ in grid]), torch.tensor([w for w, _, _ in grid])
    x = SM.sample(unet, labels, ws, steps, sampler, clip_x=clip_x, guidance=rule_factory(),
                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    return SM.to_uint8(x).permute(0, 2, 3, 1).numpy()


def guide(d):
    return M.model_from_checkpoint(M.load_checkpoint(f"{d}/guide.pt")).eval()


CLI = {  # name -> (flags, the library's rule from the checkpoints' folder, w rows, sampler)
    "interval": (["--guidance", "interval", "-p", "logsnr_lo=-2", "logsnr_hi=3", "--w", "0", "2"],
                 lambda d: functools.partial(G.interval_guided_eps, logsnr_lo=-2.0, logsnr_hi=3.0),
                 [0.0, 2.0], "ddim"),
    "interval-default": (["--guidance", "interval", "--w", "2"],
                         lambda d: G.interval_guided_eps, [2.0], "ddim"),
    "autoguidance": (["--guidance", "autoguidance", "--guide-ckpt", "{d}/guide.pt", "--w", "0",
                      "2"], lambda d: functools.partial(G.autoguided_eps, guide=guide(d)),
                     [0.0, 2.0], "ddim"),
    "rescale": (["--guidance", "rescale", "--guidance-param", "phi=0.5", "--w", "3"],
                lambda d: functools.partial(G.rescaled_guided_eps, phi=0.5), [3.0], "dpmpp2m"),
    "apg": (["--guidance", "apg", "-p", "eta=0.5", "r=4", "beta=-0.5", "--w", "0", "3"],
            lambda d: functools.partial(G.apg_eps, eta=0.5, r=4.0, beta=-0.5), [0.0, 3.0],
            "ancestral"),
    "cfgpp": (["--guidance", "cfgpp", "--w", "-1", "-0.4"], lambda d: G.cfgpp_eps,
              [-1.0, -0.4], "ddim"),
    "icg": (["--guidance", "icg", "-p", "seed=3", "--w", "2"],
            lambda d: functools.partial(G.icg_eps, seed=3), [2.0], "dpmpp2m-sde"),
    "tsg": (["--guidance", "tsg", "-p", "scale=0.5", "--w", "1"],
            lambda d: functools.partial(G.tsg_eps, scale=0.5), [1.0], "ddim"),
    "cfg-zero": (["--guidance", "cfg-zero", "-p", "zero_steps=2", "--w", "0", "2"],
                 lambda d: functools.partial(G.cfg_zero_eps, zero_steps=2), [0.0, 2.0], "ddim"),
    "schedule": (["--guidance", "schedule", "-p", "shape=cosine", "--w", "3"],
                 lambda d: functools.partial(G.scheduled_eps, shape="cosine"), [3.0],
                 "ancestral"),
}


@pytest.mark.parametrize("name", list(CLI))
def test_cli_each_rule_end_to_end(ckpts, tmp_path, name):
    """In-process main(): the npz holds exactly the library's images with the same seeds."""
    flags, rule, ws, sampler = CLI[name]
    SM.main(["--ckpt", f"{ckpts}/main.pt", "--classes", ",".join(map(str, CLASSES)),
             "--n-per-class", str(N), "--steps", "3", "--seed", str(SEED), "--sampler", sampler,
             "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]
            + [f.format(d=ckpts) for f in flags])
    data = np.load(tmp_path / "a.npz")
    assert np.allclose(data["w"], np.repeat(ws, len(CLASSES) * N))
    assert np.array_equal(data["images"], library_images(ckpts, lambda: rule(ckpts), ws, sampler))


def test_cli_from_the_shell_apg_in_batches_with_dynamic_thresholding(ckpts, tmp_path):
    """A real process: exit 0 and a grid. APG's momentum is per run: --batch-size 5 (three
    batches) gives the images of one batch of 12 (a momentum leaked from batch to batch would
    change them), and those are the library's with clip_x=0.995."""
    common = ["sample.py", "--ckpt", f"{ckpts}/main.pt", "--classes", "0,3,8", "--n-per-class",
              "2", "--steps", "4", "--seed", "5", "--guidance", "apg", "--w", "0", "3",
              "--clip", "0.995", "--sampler", "ddim"]
    proc = subprocess.run([sys.executable, *common, "--batch-size", "5",
                           "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")],
                          cwd=REPO, capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert imread(tmp_path / "a.png").ndim == 3
    SM.main(common[1:] + ["--batch-size", "64", "--out", str(tmp_path / "b.png"),
                          "--npz", str(tmp_path / "b.npz")])
    a, b = (np.load(tmp_path / f"{k}.npz")["images"].astype(int) for k in "ab")
    assert np.abs(a - b).max() <= 1  # batch size changes float rounding only (as test_sample)
    ref = library_images(ckpts, lambda: G.apg_eps, [0.0, 3.0], "ddim", clip_x=0.995, steps=4)
    assert np.array_equal(b, ref)


AUTO, INTERVAL = ["--guidance", "autoguidance", "--guide-ckpt"], ["--guidance", "interval", "-p"]
RESCALE, APG = ["--guidance", "rescale", "-p"], ["--guidance", "apg", "-p"]
BAD = [  # (arguments, a word the message must contain)
    (INTERVAL + ["logsnr_lo=3", "logsnr_hi=1"], "logsnr_lo < logsnr_hi"),
    (INTERVAL + ["logsnr_lo=0", "logsnr_hi=nan"], "finite"),
    (INTERVAL + ["logsnr_lo"], "takes logsnr_lo=VALUE, logsnr_hi=VALUE"),
    (INTERVAL + ["lo=1"], "takes logsnr_lo=VALUE, logsnr_hi=VALUE"),
    (INTERVAL + ["logsnr_lo=low"], "is not a float"),
    (["--guidance", "autoguidance"], "needs --guide-ckpt with a UNet"),
    (["--guide-ckpt", "{d}/guide.pt"], "--guide-ckpt goes with a rule that takes a second network"),
    (["--guidance", "rescale", "--guide-ckpt", "{d}/guide.pt"], "--guide-ckpt goes with"),
    (AUTO + ["{d}/missing.pt"], "no checkpoint"), (AUTO + ["{d}/guide_unfit.pt"], "do not fit"),
    (AUTO + ["{d}/garbage.pt"], "not a readable checkpoint"),
    (AUTO + ["{d}/guide_mnist.pt"], "has dataset 'mnist' but"),
    (AUTO + ["{d}/guide_size.pt"], "has image size 16 but"),
    (AUTO + ["{d}/guide_channels.pt"], "has channels 3 but"),
    (AUTO + ["{d}/guide_classes.pt"], "has number of classes 5 but"),
    (RESCALE + ["phi=1.5"], "phi = 1.5 is outside [0, 1]"),
    (RESCALE + ["phi=nan"], "outside [0, 1]"),
    (["-p", "phi=0.5"], "--guidance cfg takes no parameters"),
    (APG + ["eta=-0.1"], "eta = -0.1 is outside [0, 1]"), (APG + ["beta=1"], "outside (-1, 1)"),
    (APG + ["r=0"], "must be positive"), (APG + ["r=nan"], "must be positive"),
    (["--guidance", "cfgpp", "--w", "1.5", "--sampler", "ddim"], "in [-1, 0]"),
    (["--guidance", "cfgpp", "--w", "-0.5"], "only these samplers take: ddim"),
    (["--guidance", "classifier", "-p", "phi=0.5"], "--guidance classifier takes base=VALUE"),
    (["--guidance", "apgg"], "invalid choice"),
    (["--guidance", "tsg", "-p", "scale=0"], "must be positive"),
    (["--guidance", "cfg-zero", "-p", "zero_steps=-1"], "0 or more"),
    (["--guidance", "cfg-zero", "-p", "zero_steps=1.5"], "is not an int"),
    (["--guidance", "schedule", "-p", "shape=step"], "unknown schedule shape"),
    (["--clip", "1.5"], "percentile p in (0, 1]"), (["--clip", "nan"], "percentile p in (0, 1]"),
]


@pytest.mark.parametrize("argv,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys, argv, word):
    args = ["--ckpt", f"{ckpts}/main.pt", "--steps", "2", "--out", str(tmp_path / "s.png")]
    argv = args + [a.format(d=ckpts) for a in argv]
    err = assert_one_line_exit_2(SM.main, argv, capsys, "sample.py: error:")
    assert word in err, err
    assert not list(tmp_path.iterdir())

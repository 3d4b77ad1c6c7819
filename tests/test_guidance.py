"""guidance.py (the rules after the paper; the paper's and classifier guidance are tested in test_sample.py and
test_classifier.py) and dynamic thresholding, against independent references.

- Every rule against a float64 numpy evaluation of its published formula, written here from the papers (never by
  calling guidance.py), on a float64 stand-in network with random per-label weights (TableEps): the guidance
  interval, autoguidance, CFG rescale (on v), APG over several steps (momentum, norm threshold, projection),
  CFG++'s pair and its DDIM recursion.
- Network calls counted: the interval rule evaluates once (B) per step outside [λ_lo, λ_hi] and once (2B) inside,
  at the λ_t of the schedule computed here in numpy.
- w = 0: every rule is the conditional model (the same single pass); CFG++ is the stated exception (its x̃ is the
  conditional one, its re-noising ε is not).
- APG's parallel and orthogonal parts are orthogonal and sum to the difference; its momentum lives in the run's state
  (one bound rule gives the same images run after run), and without a state dict it is refused.
- CFG++ at γ = 0 (w = −1) is DDIM on the unconditional model, run through sample() both ways.
- Dynamic thresholding against numpy's percentile; sample()'s clip_x option.
- Every rule with every sampler it supports on a tiny random-weight U-Net; the command line end to end for each rule
  (images equal to the library call with the same seeds) and a table of bad inputs (one line, exit code 2), each
  rule's parameter check the same from Python and from the command line.
"""
import dataclasses
import functools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_exit_2
from matplotlib.image import imread
from test_sample import logsnr_grid

import guidance as G
import model as M
import sample as SM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


class TableEps(torch.nn.Module):
    """A float64 stand-in for ε_θ: ε(z, λ, c) = tanh(a_c ⊙ z + b_c + λ/10) with random a_c, b_c per label (the null
    label K last), so every label, ∅ included, gives a different ε. Records each call's batch size and labels."""

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
    """ε_c and ε_∅ as float64 numpy, from two separate calls, and α, σ of λ from their definition (B, 1, 1, 1)."""
    eps_c = net(z, logsnr, labels).numpy()
    eps_u = net(z, logsnr, torch.full_like(labels, net.null_label)).numpy()
    lam = logsnr.numpy().reshape(-1, 1, 1, 1)
    return eps_c, eps_u, np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


W = torch.tensor([0.0, 0.5, 1.0, 3.0, -1.0], dtype=torch.float64)  # per-example w, 0 and −1 among them
Wn = W.numpy().reshape(-1, 1, 1, 1)


def close(a, b, tol=1e-10):
    a = a.numpy() if torch.is_tensor(a) else a
    assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), np.abs(a - b).max()


# ---------------------------------------------------------------- each rule against its formula


def test_interval_against_its_formula_in_one_batch_or_one_pass(monkeypatch):
    monkeypatch.setitem(G.ONE_BATCH, "cpu", True)  # the paper's one batch of 2B (the device's way is tested in test_sample)
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    lo, hi = -1.0, 2.0  # rows 1, 2, 3 inside (the ends included), rows 0 and 4 outside
    inside = ((lo <= logsnr.numpy()) & (logsnr.numpy() <= hi)).reshape(-1, 1, 1, 1)
    ref = np.where(inside, (1 + Wn) * eps_c - Wn * eps_u, eps_c)
    net.calls = []
    got = G.interval_guided_eps(net, z, logsnr, labels, W, logsnr_lo=lo, logsnr_hi=hi)
    close(got, ref)
    assert net.calls == [(10, labels.tolist() + [4] * 5)]  # one batch of 2B
    net.calls = []  # no row inside: ε_θ(z, c) in one pass of B, the unconditional model never runs
    got = G.interval_guided_eps(net, z, logsnr, labels, 3.0, logsnr_lo=10.0, logsnr_hi=12.0)
    assert torch.equal(got, net(z, logsnr, labels)) and net.calls[0] == (5, labels.tolist())


@pytest.mark.parametrize("sampler", list(SM.SAMPLERS))
def test_interval_rule_calls_the_network_once_per_step_outside_the_interval(sampler, monkeypatch):
    """The whole sampler: at each λ_t (the schedule written here in numpy) one pass of B outside [λ_lo, λ_hi], one
    batch of 2B inside. The interval is chosen to split the grid of either spacing."""
    monkeypatch.setitem(G.ONE_BATCH, "cpu", True)
    net, T, B = TableEps(), 16, 3
    spacing = SM.SAMPLERS[sampler]["spacing"]
    grid = logsnr_grid(T) if spacing == "cosine" else np.linspace(-20, 20, T)
    rule = functools.partial(G.interval_guided_eps, logsnr_lo=-3.0, logsnr_hi=4.0)
    SM.sample(net, torch.tensor([0, 1, 2]), 2.0, steps=T, sampler=sampler, guidance=rule, shape=(2, 3, 3),
              generator=torch.Generator().manual_seed(0))
    expected = [2 * B if -3.0 <= lam <= 4.0 else B for lam in grid]
    assert [n for n, _ in net.calls] == expected and 0 < expected.count(2 * B) < T


def test_autoguidance_against_its_formula():
    """(1 + w) ε_good(z, c) − w ε_bad(z, c), the bad model called with c (never ∅), each network once."""
    good, bad, (z, logsnr, labels) = TableEps(seed=0), TableEps(seed=7), inputs()
    eps_good, eps_bad = good(z, logsnr, labels).numpy(), bad(z, logsnr, labels).numpy()
    good.calls, bad.calls = [], []
    got = G.autoguided_eps(good, z, logsnr, labels, W, guide=bad)
    close(got, (1 + Wn) * eps_good - Wn * eps_bad)
    assert good.calls == bad.calls == [(5, labels.tolist())]
    assert np.abs(eps_bad - good(z, logsnr, torch.full_like(labels, 4)).numpy()).max() > 0.1  # bad ≠ ∅


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_against_its_formula_on_v(phi):
    """Lin et al. on the v-prediction, from the definitions: x̂ = (z − σ ε)/α, v = α ε − σ x̂, v_cfg = (1 + w) v_c −
    w v_∅, v̂ = φ v_cfg std(v_c)/std(v_cfg) + (1 − φ) v_cfg, back to ε̃ through z = α x̂ + σ ε and v = α ε − σ x̂."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, alpha, sigma = evals(net, z, logsnr, labels)
    zn = z.numpy()
    v = lambda eps: alpha * eps - sigma * (zn - sigma * eps) / alpha
    v_c, v_u = v(eps_c), v(eps_u)
    v_cfg = (1 + Wn) * v_c - Wn * v_u
    std = lambda a: a.reshape(len(a), -1).std(axis=1).reshape(-1, 1, 1, 1)
    v_hat = phi * v_cfg * std(v_c) / std(v_cfg) + (1 - phi) * v_cfg
    x_hat = alpha * zn - sigma * v_hat  # solves z = α x̂ + σ ε, v̂ = α ε − σ x̂ (α² + σ² = 1)
    ref = (zn - alpha * x_hat) / sigma
    got = G.rescaled_guided_eps(net, z, logsnr, labels, W, phi=phi)
    close(got, ref, 1e-9)
    if phi == 0.0:
        close(got, ((1 + Wn) * eps_c - Wn * eps_u), 1e-9)  # φ = 0 is CFG
    if phi == 1.0:  # the std of the rescaled v is the conditional one's
        v_got = alpha * got.numpy() - sigma * (zn - sigma * got.numpy()) / alpha
        close(std(v_got), std(v_c), 1e-9)


def apg_reference(calls, eta, r, beta, w):
    """Sadat et al.'s Algorithm 1 in numpy over a run: calls = [(ε_c, ε_∅, z, α, σ)] at increasing λ."""
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
    """Four calls at increasing λ, new z each time: momentum, norm threshold (r chosen so that it cuts some rows
    and not others) and projection, against the numpy reference."""
    net, eta, beta = TableEps(), 0.3, -0.5
    steps = [inputs(seed=s, logsnr=tuple(lam + 0.5 * k for lam in (-3.0, -1.0, 0.0, 1.0, 3.0)))
             for k, s in enumerate(range(4))]
    first = evals(net, *steps[0])
    x_c, x_u = ((steps[0][0].numpy() - first[3] * e) / first[2] for e in first[:2])
    norms = np.sqrt(((x_c - x_u) ** 2).reshape(5, -1).sum(1))
    r = float(np.median(norms))  # about half the rows are cut at the first step
    assert (norms > r).any() and (norms < r).any()
    ref = apg_reference([(*evals(net, *s)[:2], s[0].numpy(), *evals(net, *s)[2:]) for s in steps], eta, r, beta, Wn)
    state = {}  # one run's
    for (z, logsnr, labels), eps_ref in zip(steps, ref):
        close(G.apg_eps(net, z, logsnr, labels, W, state, eta=eta, r=r, beta=beta), eps_ref, 1e-9)
    # η = 1, no threshold, no momentum: CFG itself
    z, logsnr, labels = steps[0]
    close(G.apg_eps(net, z, logsnr, labels, W, {}, eta=1.0, r=math.inf, beta=0.0),
          G.guided_eps(net, z, logsnr, labels, W).numpy(), 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apg_parts_are_orthogonal_and_sum_to_the_difference(dtype):
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    x_cond = (torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    parallel, orthogonal = G.apg_project(diff, x_cond)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    flat = lambda a: a.double().reshape(6, -1)
    assert (flat(parallel + orthogonal) - flat(diff)).abs().max() <= tol * 10
    cos = (flat(orthogonal) * flat(x_cond)).sum(1) / (flat(orthogonal).norm(dim=1) * flat(x_cond).norm(dim=1))
    assert cos.abs().max() <= tol  # Δ⊥ ⟂ x̂_c
    coef = (flat(parallel) * flat(x_cond)).sum(1, keepdim=True) / (flat(x_cond) ** 2).sum(1, keepdim=True)
    assert (flat(parallel) - coef * flat(x_cond)).abs().max() <= tol  # Δ∥ is a multiple of x̂_c
    assert flat(orthogonal).norm(dim=1).min() > 1 and flat(parallel).norm(dim=1).min() > 0.1  # both parts there


def test_apg_momentum_belongs_to_one_run():
    """sample() gives the rule a fresh state per run: the same bound APG twice gives the same images, and they are
    not those of APG without momentum (so the momentum was carried from step to step within the run)."""
    net, labels = TableEps(), torch.tensor([0, 1])
    run = lambda rule: SM.sample(net, labels, 2.0, steps=4, sampler="ddim", guidance=rule, shape=(2, 3, 3),
                                 generator=torch.Generator().manual_seed(0))
    rule = functools.partial(G.apg_eps, r=math.inf)
    first = run(rule)
    assert torch.equal(run(rule), first)
    assert (run(functools.partial(G.apg_eps, r=math.inf, beta=0.0)) - first).abs().max() > 1e-3
    z, logsnr, labels = inputs()
    with pytest.raises(ValueError, match="state"):
        G.apg_eps(net, z, logsnr, labels, 2.0)


PARAMS_BAD = [  # (rule, its keyword parameters, a word the ValueError must contain): the rule's own check
    (G.interval_guided_eps, dict(logsnr_lo=3.0, logsnr_hi=1.0), "logsnr_lo < logsnr_hi"),
    (G.interval_guided_eps, dict(logsnr_lo=0.0, logsnr_hi=math.nan), "finite"),
    (G.rescaled_guided_eps, dict(phi=1.5), "[0, 1]"),
    (G.rescaled_guided_eps, dict(phi=math.nan), "[0, 1]"),
    (G.apg_eps, dict(eta=5.0), "[0, 1]"),
    (G.apg_eps, dict(r=0.0), "positive"),
    (G.apg_eps, dict(r=math.nan), "positive"),
    (G.apg_eps, dict(beta=1.0), "(-1, 1)"),
    (G.classifier_guided_eps, dict(classifier=None, base="both"), "unknown base"),
]


@pytest.mark.parametrize("rule,params,word", PARAMS_BAD, ids=[f"{r.__name__} {p}" for r, p, _ in PARAMS_BAD])
def test_each_rule_checks_its_own_parameters(rule, params, word):
    net, (z, logsnr, labels) = TableEps(), inputs()
    with pytest.raises(ValueError, match=re.escape(word)):
        rule(net, z, logsnr, labels, 2.0, {}, **params)


def test_cfgpp_checks_its_w():
    net, (z, logsnr, labels) = TableEps(), inputs()
    for bad in (0.5, torch.tensor([-0.5, -1.5, 0.0, 0.0, 0.0])):  # γ = 1 + w outside [0, 1]
        with pytest.raises(ValueError, match=re.escape("in [-1, 0]")):
            G.cfgpp_eps(net, z, logsnr, labels, bad)


def test_cfgpp_pair_against_its_formula():
    """CFG++'s ε̂ = ε_∅ + γ (ε_c − ε_∅) with γ = 1 + w for x̃, and ε_∅ to re-noise with."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    w = torch.tensor([0.0, -0.2, -0.5, -0.8, -1.0], dtype=torch.float64)  # CFG++'s range: γ = 1 + w in [0, 1]
    gamma = 1 + w.numpy().reshape(-1, 1, 1, 1)
    eps_x, eps_renoise = G.cfgpp_eps(net, z, logsnr, labels, w)
    close(eps_x, eps_u + gamma * (eps_c - eps_u))
    close(eps_renoise, eps_u)


def test_cfgpp_is_the_ddim_recursion_of_the_paper(float64_default):
    """sample() with cfgpp_eps against CFG++'s DDIM written out in numpy: x̃_t = (z_t − σ_t ε̂_γ)/α_t,
    z_{t+1} = α_{t+1} x̃_t + σ_{t+1} ε_∅(z_t), the last x̃ returned; γ = 0.6 (w = −0.4), unclipped."""
    net, labels, T, gamma = TableEps(), torch.tensor([0, 1, 2]), 10, 0.6
    x = SM.sample(net, labels, gamma - 1, steps=T, sampler="ddim", guidance=G.cfgpp_eps, clip_x=False,
                  shape=(2, 3, 3), generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(5))  # sample()'s first draw
    lam = logsnr_grid(T)
    for t in range(T):
        eps_c, eps_u, alpha, sigma = evals(net, z, torch.full((3,), lam[t]), labels)
        x_ref = (z.numpy() - sigma * (eps_u + gamma * (eps_c - eps_u))) / alpha
        if t < T - 1:
            a_next, s_next = math.sqrt(1 / (1 + math.exp(-lam[t + 1]))), math.sqrt(1 / (1 + math.exp(lam[t + 1])))
            z = torch.from_numpy(a_next * x_ref + s_next * eps_u)
    close(x, x_ref, 1e-9)


def test_cfgpp_at_gamma_0_is_ddim_on_the_unconditional_model(float64_default):
    """γ = 0 (w = −1): CFG++ through sample() equals sample() with the paper's rule at w = −1 (the unconditional
    model) and the plain DDIM step, for either spacing. At γ = 1 (w = 0) CFG++ is not conditional DDIM (documented)."""
    net, labels = TableEps(), torch.tensor([0, 1, 2, 3])
    for spacing in ("cosine", "uniform"):
        run = lambda rule, w: SM.sample(net, labels, w, steps=12, sampler="ddim", spacing=spacing, guidance=rule,
                                        clip_x=False, shape=(2, 3, 3), generator=torch.Generator().manual_seed(2))
        close(run(G.cfgpp_eps, -1.0), run(G.guided_eps, -1.0).numpy(), 1e-9)
        assert (run(G.cfgpp_eps, 0.0) - run(G.guided_eps, 0.0)).abs().max() > 1e-2


def test_cfgpp_gamma_0_on_the_unet():
    """The same on the real network in float32 (a tolerance for its rounding), unclipped: the fixed clip changes
    DDIM's ε̂ = (z − α x̃)/σ where x̃ leaves [−1, 1], not CFG++'s ε_∅."""
    unet = tiny_unet(0)
    labels = torch.tensor([1, 5, 9])
    run = lambda rule: SM.sample(unet, labels, -1.0, steps=6, sampler="ddim", guidance=rule, clip_x=False,
                                 generator=torch.Generator().manual_seed(4))
    x_cfgpp, x_ddim = run(G.cfgpp_eps), run(G.guided_eps)  # unclipped random weights: |x̃| up to 1e5
    assert (x_cfgpp - x_ddim).abs().max() <= 1e-5 * x_ddim.abs().max()


# ---------------------------------------------------------------- w = 0: the conditional model


def test_w0_every_rule_is_the_conditional_model():
    """At w = 0 (a number or all zeros per example) each rule returns ε_θ(z, c) from one pass of B, the same tensor
    sample.guided_eps gives; through the whole sampler the samples are those of the conditional model, every sampler.
    CFG++ is the exception the paper implies: x̃ from ε_θ(z, c), re-noised with ε_θ(z, ∅)."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    rules = {"interval (inside)": functools.partial(G.interval_guided_eps, logsnr_lo=-10.0, logsnr_hi=10.0),
             "autoguidance": functools.partial(G.autoguided_eps, guide=TableEps(seed=7)),
             "rescale": G.rescaled_guided_eps, "apg": G.apg_eps}
    eps_c = net(z, logsnr, labels)
    for name, rule in rules.items():
        for w in (0.0, torch.zeros(5, dtype=torch.float64)):
            net.calls = []
            got = rule(net, z, logsnr, labels, w, {})
            assert torch.equal(got, eps_c) and net.calls == [(5, labels.tolist())], name
        for sampler in SM.SAMPLERS:
            run = lambda rule: SM.sample(net, labels[:3], 0.0, steps=5, sampler=sampler, guidance=rule,
                                         shape=(2, 3, 3), generator=torch.Generator().manual_seed(1))
            assert torch.equal(run(rule), run(G.guided_eps)), (name, sampler)
    eps_x, eps_renoise = G.cfgpp_eps(net, z, logsnr, labels, 0.0)
    assert torch.equal(eps_x, eps_c) and not torch.allclose(eps_renoise, eps_c)
    # Rows with w = 0 inside a guided batch are the conditional model too (up to the rounding of the conversions).
    for name, rule in rules.items():
        got = rule(net, z, logsnr, labels, W, {})
        close(got[0], eps_c[0].numpy(), 1e-9)


# ---------------------------------------------------------------- dynamic thresholding


@pytest.mark.parametrize("p", [0.995, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_threshold_against_numpy_percentile(p, dtype):
    """s = max(1, percentile_p |x̃|) per sample (numpy's default linear interpolation), x̃ ← clip(x̃, −s, s)/s. Rows
    scaled by 0.5 … 4: some have s = 1 (the fixed clip), others s > 1."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.2, 0.5, 1, 2, 3, 4.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) * scale).to(dtype)
    xn = x.double().numpy()
    s = np.maximum(1.0, np.percentile(np.abs(xn).reshape(6, -1), 100 * p, axis=1)).reshape(-1, 1, 1, 1)
    ref = np.clip(xn, -s, s) / s
    got = SM.dynamic_threshold(x, p)
    assert got.dtype == dtype
    close(got.double(), ref, 1e-12 if dtype == torch.float64 else 1e-6)
    assert s.min() == 1.0 and s.max() > 1.5  # both cases are exercised
    assert torch.equal(SM.dynamic_threshold(x[:1], p), x[:1].clamp(-1, 1))  # s = 1: the fixed clip


def test_sample_takes_dynamic_thresholding_as_its_clip():
    """One step from λ_min with ε̃ = 0: the output is dynamic_threshold(z_1/α) of sample()'s first draw (numpy
    reference); clip_x=True stays the fixed clip; bad clip_x values are refused."""
    zero = lambda model, z, logsnr, labels, w, state: torch.zeros_like(z)
    labels = torch.zeros(4, dtype=torch.long)
    for sampler in SM.SAMPLERS:
        run = lambda clip: SM.sample(None, labels, 0.0, steps=1, sampler=sampler, guidance=zero, shape=(1, 6, 6),
                                     clip_x=clip, generator=torch.Generator().manual_seed(3))
        z = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(3)).double().numpy()
        x = z / math.sqrt(1 / (1 + math.exp(20.0)))  # x̃ = z / α at λ_min = −20
        s = np.maximum(1.0, np.percentile(np.abs(x).reshape(4, -1), 99.5, axis=1)).reshape(-1, 1, 1, 1)
        close(run(0.995).double(), np.clip(x, -s, s) / s, 1e-5)
        close(run(True).double(), np.clip(x, -1, 1), 1e-6)
    for bad in (0.0, 1.5, 1, "dynamic", None):
        with pytest.raises(ValueError, match="clip_x"):
            SM.sample(None, labels, 0.0, steps=1, guidance=zero, shape=(1,), clip_x=bad)


# ---------------------------------------------------------------- every rule, every sampler, the real network


def tiny_unet(seed, **change):
    """A digits-preset U-Net (or a changed copy) with random weights, its zero-initialised layers too."""
    torch.manual_seed(seed)
    net = M.UNet(dataclasses.replace(M.PRESETS["digits"], **change)).eval().requires_grad_(False)
    for p in net.parameters():
        if not p.any():
            p.normal_(0, 0.1)
    return net


RULES = {  # name -> (a factory of the rule, the samplers it is defined with)
    "interval": (lambda: functools.partial(G.interval_guided_eps, logsnr_lo=-2.0, logsnr_hi=3.0), list(SM.SAMPLERS)),
    "autoguidance": (lambda: functools.partial(G.autoguided_eps, guide=tiny_unet(9, channels=16)), list(SM.SAMPLERS)),
    "rescale": (lambda: G.rescaled_guided_eps, list(SM.SAMPLERS)),
    "apg": (lambda: G.apg_eps, list(SM.SAMPLERS)),
    "cfgpp": (lambda: G.cfgpp_eps, ["ddim"]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_with_every_sampler_it_supports(name):
    unet, (factory, samplers) = tiny_unet(0), RULES[name]
    labels, w = torch.tensor([1, 7, 3]), torch.tensor([0.0, 2.0, -1.0] if name != "cfgpp" else [0.0, -0.4, -1.0])
    for sampler in SM.SAMPLERS:
        run = lambda rule, clip=True: SM.sample(unet, labels, w, steps=4, sampler=sampler, guidance=rule, clip_x=clip,
                                                generator=torch.Generator().manual_seed(0))
        if sampler not in samplers:
            with pytest.raises(ValueError, match="only these samplers take: ddim"):
                run(factory())
            continue
        for clip in (True, False, 0.995):
            x = run(factory(), clip)
            assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        assert (x - run(G.guided_eps, 0.995))[1].abs().max() > 1e-3  # the rule changed the guided row


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A digits checkpoint, a smaller guide of the same data, and guides that do not fit."""
    d = tmp_path_factory.mktemp("guidance_ckpts")

    def write(name, net, dataset="digits", **extra):
        state = net.state_dict()
        M.save_checkpoint({"model": state, "ema": state, "step": 0, "config": dataclasses.asdict(net.config),
                           "args": {"dataset": dataset}, **extra}, str(d / name))
    write("main.pt", tiny_unet(0))
    write("guide.pt", tiny_unet(9, channels=16), step=50)
    write("guide_mnist.pt", tiny_unet(9, channels=16), dataset="mnist")
    write("guide_size.pt", tiny_unet(9, channels=16, image_size=16))
    write("guide_channels.pt", tiny_unet(9, channels=16, in_channels=3))
    write("guide_classes.pt", tiny_unet(9, channels=16, num_classes=5))
    net = tiny_unet(9, channels=16)
    M.save_checkpoint({"model": net.state_dict(), "ema": net.state_dict(), "step": 0,
                       "config": {**dataclasses.asdict(net.config), "channels": 8}}, str(d / "guide_unfit.pt"))
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    return d


CLASSES, N, SEED = (0, 3, 8), 2, 5


def library_images(ckpts, rule_factory, ws, sampler, clip_x=True, steps=3):
    """What the command line must write: sample() per image with its (seed, class, index) generator, one batch."""
    unet = M.model_from_checkpoint(M.load_checkpoint(f"{ckpts}/main.pt")).eval()
    grid = [(w, c, j) for w in ws for c in CLASSES for j in range(N)]
    seeds = [int(np.random.SeedSequence([SEED, c, j]).generate_state(1)[0]) for _, c, j in grid]
    x = SM.sample(unet, torch.tensor([c for _, c, _ in grid]), torch.tensor([w for w, _, _ in grid]), steps, sampler,
                  clip_x=clip_x, guidance=rule_factory(), generator=[torch.Generator().manual_seed(s) for s in seeds])
    return SM.to_uint8(x).permute(0, 2, 3, 1).numpy()


def guide_from(ckpts):
    return M.model_from_checkpoint(M.load_checkpoint(f"{ckpts}/guide.pt")).eval()


CLI = {  # name -> (flags, library rule factory, w rows, sampler)
    "interval": (["--guidance", "interval", "-p", "logsnr_lo=-2", "logsnr_hi=3", "--w", "0", "2"],
                 lambda ckpts: functools.partial(G.interval_guided_eps, logsnr_lo=-2.0, logsnr_hi=3.0), [0.0, 2.0],
                 "ddim"),
    "interval-default": (["--guidance", "interval", "--w", "2"], lambda ckpts: G.interval_guided_eps, [2.0], "ddim"),
    "autoguidance": (["--guidance", "autoguidance", "--guide-ckpt", "{d}/guide.pt", "--w", "0", "2"],
                     lambda ckpts: functools.partial(G.autoguided_eps, guide=guide_from(ckpts)), [0.0, 2.0], "ddim"),
    "rescale": (["--guidance", "rescale", "--guidance-param", "phi=0.5", "--w", "3"],
                lambda ckpts: functools.partial(G.rescaled_guided_eps, phi=0.5), [3.0], "dpmpp2m"),
    "apg": (["--guidance", "apg", "-p", "eta=0.5", "r=4", "beta=-0.5", "--w", "0", "3"],
            lambda ckpts: functools.partial(G.apg_eps, eta=0.5, r=4.0, beta=-0.5), [0.0, 3.0], "ancestral"),
    "cfgpp": (["--guidance", "cfgpp", "--w", "-1", "-0.4"], lambda ckpts: G.cfgpp_eps, [-1.0, -0.4], "ddim"),
}


@pytest.mark.parametrize("name", list(CLI))
def test_cli_each_rule_end_to_end(ckpts, tmp_path, name):
    """In-process main(): the npz holds exactly the images of the library call with the same per-image seeds."""
    flags, factory, ws, sampler = CLI[name]
    args = ["--ckpt", f"{ckpts}/main.pt", "--classes", ",".join(map(str, CLASSES)), "--n-per-class", str(N),
            "--steps", "3", "--seed", str(SEED), "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz"),
            "--sampler", sampler]
    SM.main(args + [f.format(d=ckpts) for f in flags])
    data = np.load(tmp_path / "a.npz")
    assert np.allclose(data["w"], np.repeat(ws, len(CLASSES) * N))
    assert np.array_equal(data["images"], library_images(ckpts, lambda: factory(ckpts), ws, sampler))


def test_cli_from_the_shell_apg_in_batches_with_dynamic_thresholding(ckpts, tmp_path):
    """A real process: exit 0 and a grid. APG's momentum is per run: --batch-size 5 (3 batches) gives the images
    of one batch of 12 (a momentum leaked from one batch into the next would change them), and those are the
    library's with clip_x=0.995."""
    common = ["sample.py", "--ckpt", f"{ckpts}/main.pt", "--classes", "0,3,8", "--n-per-class", "2", "--steps", "4",
              "--seed", "5", "--guidance", "apg", "--w", "0", "3", "--clip", "0.995", "--sampler", "ddim"]
    proc = subprocess.run([sys.executable, *common, "--batch-size", "5", "--out", str(tmp_path / "a.png"),
                           "--npz", str(tmp_path / "a.npz")], cwd=REPO, capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert imread(tmp_path / "a.png").ndim == 3
    SM.main(common[1:] + ["--batch-size", "64", "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")])
    a, b = (np.load(tmp_path / f"{k}.npz")["images"].astype(int) for k in "ab")
    assert np.abs(a - b).max() <= 1  # batch size changes float rounding only (as tests/test_sample.py)
    assert np.array_equal(b, library_images(ckpts, lambda: G.apg_eps, [0.0, 3.0], "ddim", clip_x=0.995, steps=4))


AUTO = ["--guidance", "autoguidance", "--guide-ckpt"]
BAD = [  # (arguments, a word the message must contain)
    (["--guidance", "interval", "-p", "logsnr_lo=3", "logsnr_hi=1"], "logsnr_lo < logsnr_hi"),
    (["--guidance", "interval", "-p", "logsnr_lo=0", "logsnr_hi=nan"], "finite"),
    (["--guidance", "interval", "-p", "logsnr_lo"], "takes logsnr_lo=VALUE, logsnr_hi=VALUE"),
    (["--guidance", "interval", "-p", "lo=1"], "takes logsnr_lo=VALUE, logsnr_hi=VALUE"),
    (["--guidance", "interval", "-p", "logsnr_lo=low"], "is not a float"),
    (["--guidance", "autoguidance"], "needs --guide-ckpt with a UNet"),
    (["--guide-ckpt", "{d}/guide.pt"], "--guide-ckpt goes with a rule that takes a second network"),
    (["--guidance", "rescale", "--guide-ckpt", "{d}/guide.pt"], "--guide-ckpt goes with"),
    (AUTO + ["{d}/missing.pt"], "no checkpoint"),
    (AUTO + ["{d}/garbage.pt"], "not a readable checkpoint"),
    (AUTO + ["{d}/guide_unfit.pt"], "do not fit"),
    (AUTO + ["{d}/guide_mnist.pt"], "has dataset 'mnist' but"),
    (AUTO + ["{d}/guide_size.pt"], "has image size 16 but"),
    (AUTO + ["{d}/guide_channels.pt"], "has channels 3 but"),
    (AUTO + ["{d}/guide_classes.pt"], "has number of classes 5 but"),
    (["--guidance", "rescale", "-p", "phi=1.5"], "phi = 1.5 is outside [0, 1]"),
    (["--guidance", "rescale", "-p", "phi=nan"], "outside [0, 1]"),
    (["-p", "phi=0.5"], "--guidance cfg takes no parameters"),
    (["--guidance", "apg", "-p", "eta=-0.1"], "eta = -0.1 is outside [0, 1]"),
    (["--guidance", "apg", "-p", "r=0"], "must be positive"),
    (["--guidance", "apg", "-p", "r=nan"], "must be positive"),
    (["--guidance", "apg", "-p", "beta=1"], "outside (-1, 1)"),
    (["--guidance", "cfgpp", "--w", "1.5", "--sampler", "ddim"], "in [-1, 0]"),
    (["--guidance", "cfgpp", "--w", "-0.5"], "only these samplers take: ddim"),
    (["--guidance", "classifier", "-p", "phi=0.5"], "--guidance classifier takes base=VALUE"),
    (["--guidance", "apgg"], "invalid choice"),
    (["--clip", "1.5"], "percentile p in (0, 1]"),
    (["--clip", "nan"], "percentile p in (0, 1]"),
]


@pytest.mark.parametrize("argv,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys, argv, word):
    args = ["--ckpt", f"{ckpts}/main.pt", "--steps", "2", "--out", str(tmp_path / "s.png")]
    err = assert_one_line_exit_2(SM.main, args + [a.format(d=ckpts) for a in argv], capsys, "sample.py: error:")
    assert word in err, err
    assert not list(tmp_path.iterdir())

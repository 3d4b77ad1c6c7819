"""The rules that guide without the null label (ICG, TSG), CFG-Zero* and the strength schedules,
each against its published formula evaluated independently in float64 numpy."""
import math

import numpy as np
import pytest
import torch
from test_guidance import TableEps, W, Wn, evals, inputs

import guidance as G

pytestmark = pytest.mark.usefixtures("one_thread")


def test_icg_against_its_formula_with_the_drawn_labels():
    """ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z, ĉ), ĉ uniform over the K classes (never ∅), drawn per
    step from the run's generator: the same seed draws the same ĉ, a second step new ones."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    state = {}
    got = [G.icg_eps(net, z, logsnr, labels, W, state, seed=3) for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    for step in range(2):
        other = torch.randint(net.null_label, (5,), generator=generator)
        assert (other < net.null_label).all()
        eps_c = net(z, logsnr, labels).numpy()
        eps_o = net(z, logsnr, other).numpy()
        np.testing.assert_allclose(got[step].numpy(), (1 + Wn) * eps_c - Wn * eps_o, rtol=1e-12)
    assert not torch.equal(got[0], got[1])  # new labels at the second step


class BlindToOtherLabels(torch.nn.Module):
    """ε(z, c′) = ε(z, ∅) for every label c′ but the row's own: the random label carries nothing."""

    def __init__(self, net, asked):
        super().__init__()
        self.net, self.asked, self.null_label = net, asked, net.null_label

    def forward(self, z, logsnr, labels):
        own = labels == self.asked.repeat(len(labels) // len(self.asked))
        return self.net(z, logsnr, torch.where(own, labels, self.null_label))


def test_icg_is_cfg_when_the_random_label_carries_no_information():
    net, (z, logsnr, labels) = TableEps(), inputs()
    blind = BlindToOtherLabels(net, labels)
    got = G.icg_eps(blind, z, logsnr, labels, W, {}, seed=0)
    other = torch.randint(net.null_label, (5,), generator=torch.Generator().manual_seed(0))
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    same = (other == labels).numpy()  # where ĉ = c both terms are ε_c: no guidance
    expected = np.where(same.reshape(-1, 1, 1, 1), eps_c, (1 + Wn) * eps_c - Wn * eps_u)
    assert (~same).sum() >= 2
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_tsg_against_its_formula_with_the_drawn_perturbation():
    net, (z, logsnr, labels) = TableEps(), inputs()
    got = G.tsg_eps(net, z, logsnr, labels, W, {}, scale=0.7, seed=4)
    xi = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = net(z, logsnr, labels).numpy()
    eps_p = net(z, logsnr + 0.7 * xi, labels).numpy()
    np.testing.assert_allclose(got.numpy(), (1 + Wn) * eps - Wn * eps_p, rtol=1e-12)


def velocity(z, eps, alpha, sigma):
    """The rectified-flow velocity v = ε − x̂, x̂ = (z − σ ε)/α, by its definition."""
    return eps - (z - sigma * eps) / alpha


def test_cfg_zero_star_against_its_formula_in_v_with_a_direct_least_squares_scale():
    net, (z, logsnr, labels) = TableEps(), inputs()
    state = {}
    zeroed = G.cfg_zero_eps(net, z, logsnr, labels, W, state, zero_steps=1)
    got = G.cfg_zero_eps(net, z, logsnr, labels, W, state, zero_steps=1)
    eps_c, eps_u, alpha, sigma = evals(net, z, logsnr, labels)
    zn = z.numpy()
    # The zeroed step: v = ε − x̂ = 0, so x̂ = ε and z / (α + σ) stays where it is.
    x_hat = (zn - sigma * zeroed.numpy()) / alpha
    np.testing.assert_allclose(x_hat, zeroed.numpy(), rtol=1e-10, atol=1e-12)
    v_c, v_u = velocity(zn, eps_c, alpha, sigma), velocity(zn, eps_u, alpha, sigma)
    expected = []
    for i in range(5):  # s* by a least-squares solve of min_s ‖s v_∅ − v_c‖²
        s_star = np.linalg.lstsq(v_u[i].reshape(-1, 1), v_c[i].reshape(-1), rcond=None)[0][0]
        v = s_star * v_u[i] + (1 + Wn[i]) * (v_c[i] - s_star * v_u[i])  # their guided velocity
        expected.append((alpha[i] * v + zn[i]) / (alpha[i] + sigma[i]))  # ε from v
    np.testing.assert_allclose(got.numpy(), np.stack(expected), rtol=1e-9, atol=1e-12)
    assert state["cfg_zero_step"] == 1


class AskedLabelOnly(BlindToOtherLabels):
    """ε(z, c′) = ε(z, c) for every c′, ∅ included: u_∅ = u_c, so s* = 1."""

    def forward(self, z, logsnr, labels):
        return self.net(z, logsnr, self.asked.repeat(len(labels) // len(self.asked)))


def test_cfg_zero_star_is_cfg_where_the_scale_is_one():
    """If ε_θ(z, ∅) is ε_θ(z, c) (s* = 1) both give ε_c; and with no zeroed step at w = 0, ε_c."""
    net, (z, logsnr, labels) = TableEps(), inputs()
    same = AskedLabelOnly(net, labels)
    got = G.cfg_zero_eps(same, z, logsnr, labels, W, {}, zero_steps=0)
    np.testing.assert_allclose(got.numpy(), net(z, logsnr, labels).numpy(), rtol=1e-10)
    assert torch.equal(G.cfg_zero_eps(net, z, logsnr, labels, 0.0, {}, zero_steps=0),
                       net(z, logsnr, labels))


def test_a_constant_schedule_is_cfg_exactly_and_the_others_follow_t():
    net, (z, logsnr, labels) = TableEps(), inputs()
    assert torch.equal(G.scheduled_eps(net, z, logsnr, labels, W, {}, shape="constant"),
                       G.guided_eps(net, z, logsnr, labels, W))
    # t(λ) of the cosine schedule, by its definition λ = −2 log tan(a t + b) over [−20, 20]
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    t = (np.arctan(np.exp(-logsnr.numpy() / 2)) - b) / a
    eps_c, eps_u, _, _ = evals(net, z, logsnr, labels)
    for shape, f in [("linear", 2 * (1 - t)), ("cosine", 1 + np.cos(np.pi * t))]:
        w_t = (Wn.ravel() * f).reshape(-1, 1, 1, 1)
        got = G.scheduled_eps(net, z, logsnr, labels, W, {}, shape=shape)
        np.testing.assert_allclose(got.numpy(), (1 + w_t) * eps_c - w_t * eps_u, rtol=1e-10)
    # Both average 1 over t in [0, 1] (the mean strength is w) and start at 0 at the noise end.
    tt = torch.linspace(0, 1, 100001, dtype=torch.float64)
    for shape in ("linear", "cosine"):
        f = G.SCHEDULES[shape](tt)
        assert abs(torch.trapezoid(f, tt).item() - 1) < 1e-8 and f[-1].abs() < 1e-12


@pytest.mark.parametrize("rule,params,word", [
    (G.tsg_eps, dict(scale=0.0), "must be positive"),
    (G.tsg_eps, dict(scale=math.nan), "must be positive"),
    (G.cfg_zero_eps, dict(zero_steps=-1), "0 or more"),
    (G.scheduled_eps, dict(shape="step"), "unknown schedule shape"),
])
def test_each_new_rule_checks_its_parameters(rule, params, word):
    net, (z, logsnr, labels) = TableEps(), inputs()
    with pytest.raises(ValueError, match=word):
        rule(net, z, logsnr, labels, 2.0, {}, **params)


@pytest.mark.parametrize("rule", [G.icg_eps, G.tsg_eps, G.cfg_zero_eps])
def test_rules_that_keep_state_ask_for_it(rule):
    net, (z, logsnr, labels) = TableEps(), inputs()
    with pytest.raises(ValueError, match="state"):
        rule(net, z, logsnr, labels, 2.0)

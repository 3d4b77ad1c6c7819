"""model.py: shapes for every preset, the null label ∅, gradient flow, a quick overfit,
self-describing checkpoints."""
import dataclasses
import math

import pytest
import torch

import model as M
from presets import PRESETS


def randomize(net, seed=0):
    """Fresh random weights everywhere, including the zero-initialised output layers, so that
    every input (labels included) visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shape_equals_input_shape(name):
    config = PRESETS[name].network
    net = M.UNet(config).eval()
    z = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        eps = net(z, torch.tensor([-20.0, 20.0]), torch.tensor([0, config.num_classes]))
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def test_cifar10_preset_is_the_ddpm_network():
    n = sum(p.numel() for p in M.UNet(PRESETS["cifar10"].network).parameters())
    assert abs(n - 35.7e6) < 0.1e6  # DDPM's CIFAR-10 model: 35.7M parameters


def test_null_label_is_its_own_class():
    config = PRESETS["digits"].network
    net = randomize(M.UNet(config))
    assert net.null_label == config.num_classes == 10
    n = config.num_classes + 1  # every class and ∅
    z = torch.randn(1, 1, 8, 8).expand(n, -1, -1, -1)
    with torch.no_grad():
        eps = net(z, torch.full((n,), 1.5), torch.arange(n))
    eps_null = eps[-1]
    for c in range(config.num_classes):  # label 0 included: it is the digit zero, not ∅
        assert (eps[c] - eps_null).abs().max() > 1e-3
    with pytest.raises(IndexError):  # nothing beyond ∅
        net(z[:1], torch.zeros(1), torch.tensor([config.num_classes + 1]))


def test_logsnr_changes_output_and_scalar_broadcasts():
    net = randomize(M.UNet(PRESETS["digits"].network))
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 10])
    with torch.no_grad():
        a = net(z, torch.full((3,), -5.0), labels)
        b = net(z, -5.0, labels)
        c = net(z, 5.0, labels)
    assert torch.allclose(a, b) and (a - c).abs().max() > 1e-3


def test_logsnr_to_unit_is_bounded_and_inverts_the_untruncated_cosine():
    lam = torch.linspace(-20, 20, 101, dtype=torch.float64)
    u = M.logsnr_to_unit(lam)
    assert (u > 0).all() and (u < 1).all() and (u[1:] < u[:-1]).all()
    # λ = −2 log tan(π u / 2) is the cosine schedule with λ_min = −∞, λ_max = +∞.
    assert torch.allclose(-2 * torch.log(torch.tan(math.pi * u / 2)), lam, atol=1e-9)


def test_gradients_reach_the_class_embedding():
    net = randomize(M.UNet(PRESETS["digits"].network)).train()
    labels = torch.tensor([3, 3, 7, 10])
    loss = net(torch.randn(4, 1, 8, 8), torch.zeros(4), labels).pow(2).mean()
    loss.backward()
    grad = net.label_emb.weight.grad
    used = torch.zeros(11, dtype=torch.bool)
    used[labels] = True
    assert (grad[used].abs().sum(dim=1) > 0).all()  # 3, 7 and ∅ get gradient
    assert (grad[~used] == 0).all()  # the other rows do not


def test_digits_preset_overfits_a_fixed_batch():
    """A fixed (x, λ, ε, c) is a regression problem: the loss must fall at least 10×."""
    torch.manual_seed(0)
    net = M.UNet(PRESETS["digits"].network).train()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    eps = torch.randn(8, 1, 8, 8)
    logsnr = torch.linspace(-5, 5, 8)
    labels = torch.arange(8)
    alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]  # α_λ² = sigmoid(λ)
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]  # σ_λ² = sigmoid(−λ)
    z = alpha * x + sigma * eps
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for step in range(300):
        loss = (net(z, logsnr, labels) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[0] > 0.5  # ε has unit variance and the output starts at zero
    fell = f"loss fell only from {losses[0]:.3f} to {min(losses):.3f} in 300 steps"
    assert losses[-1] < losses[0] / 10, fell


def test_checkpoint_round_trip_and_refusals(tmp_path):
    config = PRESETS["digits"].network
    net = randomize(M.UNet(config))
    path = str(tmp_path / "ckpt.pt")
    M.save_checkpoint({"config": dataclasses.asdict(config), "ema": net.state_dict(),
                       "model": net.state_dict(), "step": 7, "args": {"dataset": "digits"}}, path)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no temporary left behind
    ckpt = M.load_checkpoint(path)
    net2 = M.model_from_checkpoint(ckpt).eval()
    assert net2.config == config and ckpt["step"] == 7
    z = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(net(z, torch.zeros(2), labels), net2(z, torch.zeros(2), labels))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(M.CheckpointError, match="truncated or corrupt"):
        M.load_checkpoint(str(truncated))

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))
    evil = str(tmp_path / "evil.pt")
    torch.save({"config": {}, "ema": {}, "payload": RunsCode()}, evil)
    with pytest.raises(M.CheckpointError, match="pickled Python objects"):
        M.load_checkpoint(evil)
    with pytest.raises(M.CheckpointError, match="no checkpoint"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))

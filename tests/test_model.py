"""model.py: shapes for every preset, the null label ∅, gradient flow, a quick overfit,
self-describing checkpoints, the fast Dropout (Monte Carlo against Bernoulli) and speed_up_cpu."""
import math
import os
import subprocess
import sys

import pytest
import torch

import model as M


def randomize(net, seed=0):
    """Fresh random weights everywhere, including the zero-initialised output layers, so that
    every input (labels included) visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


@pytest.mark.parametrize("name", list(M.PRESETS))
def test_output_shape_equals_input_shape(name):
    config = M.PRESETS[name]
    net = M.UNet(config).eval()
    z = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        eps = net(z, torch.tensor([-20.0, 20.0]), torch.tensor([0, config.num_classes]))
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def test_cifar10_preset_is_the_ddpm_network():
    n = sum(p.numel() for p in M.UNet(M.PRESETS["cifar10"]).parameters())
    assert abs(n - 35.7e6) < 0.1e6  # DDPM's CIFAR-10 model: 35.7M parameters


def test_null_label_is_its_own_class():
    config = M.PRESETS["digits"]
    net = randomize(M.UNet(config))
    assert net.null_label == config.num_classes == 10
    z = torch.randn(1, 1, 8, 8).expand(config.num_classes + 1, -1, -1, -1)
    with torch.no_grad():
        eps = net(z, torch.full((config.num_classes + 1,), 1.5), torch.arange(config.num_classes + 1))
    eps_null = eps[-1]
    for c in range(config.num_classes):  # label 0 included: it is the digit zero, not ∅
        assert (eps[c] - eps_null).abs().max() > 1e-3
    with pytest.raises(IndexError):  # nothing beyond ∅
        net(z[:1], torch.zeros(1), torch.tensor([config.num_classes + 1]))


def test_logsnr_changes_output_and_scalar_broadcasts():
    net = randomize(M.UNet(M.PRESETS["digits"]))
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
    net = randomize(M.UNet(M.PRESETS["digits"])).train()
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
    net = M.UNet(M.PRESETS["digits"]).train()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    eps = torch.randn(8, 1, 8, 8)
    logsnr = torch.linspace(-5, 5, 8)
    labels = torch.arange(8)
    alpha, sigma = torch.sigmoid(logsnr).sqrt()[:, None, None, None], torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
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
    assert losses[-1] < losses[0] / 10, f"loss fell only from {losses[0]:.3f} to {min(losses):.3f} in 300 steps"


def test_checkpoint_round_trip_and_refusals(tmp_path):
    config = M.PRESETS["digits"]
    net = randomize(M.UNet(config))
    path = str(tmp_path / "ckpt.pt")
    M.save_checkpoint({"config": M.config_to_dict(config), "ema": net.state_dict(),
                       "model": net.state_dict(), "step": 7, "args": {"dataset": "digits"}}, path)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no temporary left behind
    ckpt = M.load_checkpoint(path)
    net2 = M.model_from_checkpoint(ckpt).eval()
    assert net2.config == config and ckpt["step"] == 7
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(z, torch.zeros(2), torch.tensor([1, 10])), net2(z, torch.zeros(2), torch.tensor([1, 10])))

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


# ---------------------------------------------------------------- Dropout and speed_up_cpu


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics_against_bernoulli(p):
    """Monte Carlo against the Bernoulli(p) law: the dropped fraction, the kept value 1/(1 − p), the
    mean, and independence of neighbours (two neighbours share one 64-bit draw) and across channels
    in the channels_last layout, each within 5 standard errors."""
    torch.manual_seed(0)
    drop = M.Dropout(p).train()
    for x in (torch.ones(2_000_001), torch.ones(64, 32, 31, 31).contiguous(memory_format=torch.channels_last)):
        y = drop(x)
        n, dropped = y.numel(), (y == 0).double()
        assert y.shape == x.shape and y.stride() == x.stride()
        assert abs(dropped.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
        assert torch.allclose(y[y != 0].double(), torch.tensor(1 / (1 - p), dtype=torch.float64), rtol=1e-6, atol=0)
        assert abs(y.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)
        flat = dropped.flatten() if x.is_contiguous() else dropped.permute(0, 2, 3, 1).flatten()  # memory order
        pairs = flat[: n - n % 2].view(-1, 2)  # the two halves of one draw
        both = (pairs[:, 0] * pairs[:, 1]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / len(pairs))
        if not x.is_contiguous():  # channels 0 and 1 of each pixel: neighbours in memory
            both, m = (dropped[:, 0] * dropped[:, 1]).mean().item(), dropped[:, 0].numel()
            assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / m)


def test_dropout_gradient_eval_edges_and_seeds():
    torch.manual_seed(1)
    drop = M.Dropout(0.3).train()
    x = torch.randn(7, 5, 3, requires_grad=True)  # odd numel: the last draw is half used
    y = drop(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).double()
    assert torch.allclose(x.grad.double(), g.double() * mask / 0.7, rtol=1e-6, atol=1e-7)
    assert torch.allclose(y.double(), x.detach().double() * mask / 0.7, rtol=1e-6, atol=1e-7)
    t = torch.randn(4, 6).t()  # not contiguous in any layout
    yt = drop(t)
    assert yt.shape == (6, 4) and ((yt == 0) | torch.isclose(yt, t / 0.7, rtol=1e-6, atol=0)).all()
    assert drop(torch.ones(10, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)  # eval: the identity
    assert torch.equal(M.Dropout(0.0).train()(x), x) and not M.Dropout(1.0).train()(x).any()
    torch.manual_seed(5)
    a = M.Dropout(0.5).train()(torch.ones(1000))
    torch.manual_seed(5)
    b = M.Dropout(0.5).train()(torch.ones(1000))
    assert torch.equal(a, b) and not torch.equal(a, M.Dropout(0.5).train()(torch.ones(1000)))
    with pytest.raises(ValueError, match="dropout probability"):
        M.Dropout(1.5)


def test_speed_up_cpu_keeps_the_function_and_stops_page_faults():
    """channels_last changes the layout, not the output (against the NCHW model); and in a fresh
    process, freed 64 MiB tensors' pages are reused (fewer page faults) only after speed_up_cpu."""
    torch.manual_seed(0)
    config = M.PRESETS["digits"]
    net = randomize(M.UNet(config))
    z, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 9, 10])
    ref = net(z, torch.linspace(-5, 5, 4), labels)
    fast = M.speed_up_cpu(net)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(z, torch.linspace(-5, 5, 4), labels), ref, rtol=1e-4, atol=1e-5)
    script = ("import resource, sys, torch, model\n"
              "if sys.argv[1] == 'on': model.speed_up_cpu(torch.nn.Conv2d(1, 1, 1))\n"
              "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(30): torch.ones(2 ** 24)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)\n")
    here = os.path.dirname(os.path.abspath(M.__file__))
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], cwd=here, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("off", "on")}
    pages = 30 * 2 ** 26 // 4096  # thirty 64 MiB tensors of 4 KiB pages
    assert faults["off"] > pages // 2 and faults["on"] < pages // 3, faults

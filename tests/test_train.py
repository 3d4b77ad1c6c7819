"""train.py against independent references: binomial bounds for label dropout, scipy's
hyperbolic-secant law (KS test) for λ, Algorithm 1's loss by hand in float64 with replayed
noise; for the script, a resumed run that ends with an uninterrupted run's weights, a torchrun
job whose two processes hold identical weights (and that stops on every rank when its
--out-dir is taken), and a run on an image folder written here.

Runs train.py in subprocesses on the digits preset (offline), OMP_NUM_THREADS=1 each.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import cli
import data
import presets
import train
from model import UNet, load_checkpoint, model_from_checkpoint
from presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
# A short digits run: small batch, checkpoint every 5 steps, no preview grids.
RUN = ["--dataset", "digits", "--batch-size", "16", "--log-every", "5", "--ckpt-every", "5",
       "--sample-every", "0", "--warmup-steps", "5", "--seed", "3"]
STEPS = 24


def run_train(args, timeout=120, script=None, env=None):
    """python train.py ARGS (or python -c SCRIPT ARGS) in the repo: the CompletedProcess."""
    command = [sys.executable, "-c", script] if script else [sys.executable, "train.py"]
    return subprocess.run(command + list(args), capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})}, cwd=REPO)


def assert_same_state(a, b):
    """Same weights, EMA, Adam moments and loss history (float tolerance)."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-7,
                                       msg=f"{key}.{name}")
    for i, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name], b["optimizer"]["state"][i][name],
                                       rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps whose previews cannot be written (it must go on)."""
    out = tmp_path_factory.mktemp("reference")
    script = ("import sys, sample, train\n"
              "def broken(*args, **kwargs): raise OSError('no space left')\n"
              "sample.save_grid = broken\ntrain.main(sys.argv[1:])")
    args = RUN + ["--max-steps", str(STEPS), "--sample-every", "10", "--out-dir", str(out),
                  "--json", str(out / "run.json")]
    result = run_train(args, script=script)
    assert result.returncode == 0, result.stderr
    return out, result


# ------------------------------------------------------------------ Alg. 1, line 3: label dropout

@pytest.mark.parametrize("p_uncond", [0.1, 0.2, 0.5])
def test_drop_labels_rate_is_binomial_and_uses_the_null_label(p_uncond):
    n, null = 200_000, 10
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    out = train.drop_labels(labels, p_uncond, null, generator=torch.Generator().manual_seed(1))
    dropped = out == null
    # The dropped count is Binomial(n, p_uncond): within 5 standard deviations.
    assert abs(dropped.sum().item() - n * p_uncond) < 5 * math.sqrt(n * p_uncond * (1 - p_uncond))
    # Kept labels are unchanged; dropped ones are exactly ∅ (never another class).
    assert torch.equal(out[~dropped], labels[~dropped])
    assert set(out.unique().tolist()) <= set(range(10)) | {null}
    # Per example and independent of the class: each class is dropped at the same rate.
    for c in range(10):
        k, m = dropped[labels == c].sum().item(), (labels == c).sum().item()
        assert abs(k - m * p_uncond) < 5 * math.sqrt(m * p_uncond * (1 - p_uncond))


def test_drop_labels_edge_cases():
    labels = torch.arange(10).repeat(100)
    assert torch.equal(train.drop_labels(labels, 0.0, 10), labels)
    assert torch.equal(train.drop_labels(labels, 1.0, 10), torch.full_like(labels, 10))
    assert train.drop_labels(labels, 0.5, 10).dtype == torch.int64


# ------------------------------------------------------------------ Alg. 1, line 4: λ ~ p(λ)

def truncated_sech_cdf(logsnr, logsnr_min=-20.0, logsnr_max=20.0):
    """CDF of λ = −2 log tan(a u + b), u ~ U(0, 1), by hand with scipy's hypsecant, float64.

    The density |du/dλ| ∝ sech(λ/2): λ/2 follows the hyperbolic-secant law (CDF
    (2/π) arctan(e^x)) truncated to [λ_min/2, λ_max/2]."""
    cdf = scipy.stats.hypsecant.cdf
    lo, hi = cdf(logsnr_min / 2), cdf(logsnr_max / 2)
    return (cdf(np.asarray(logsnr, dtype=np.float64) / 2) - lo) / (hi - lo)


@pytest.mark.parametrize("schedule", ["cosine", "uniform"])
def test_sample_logsnr_range_and_density(schedule):
    logsnr = train.sample_logsnr(50_000, schedule, generator=torch.Generator().manual_seed(2))
    assert logsnr.shape == (50_000,) and logsnr.dtype == torch.float32
    assert logsnr.min() >= -20.0 and logsnr.max() <= 20.0
    cosine, uniform = truncated_sech_cdf, scipy.stats.uniform(loc=-20, scale=40).cdf
    right, wrong = (cosine, uniform) if schedule == "cosine" else (uniform, cosine)
    draws = logsnr.double().numpy()
    assert scipy.stats.kstest(draws, right).pvalue > 1e-3
    assert scipy.stats.kstest(draws, wrong).pvalue < 1e-10  # the test tells them apart


def test_sample_logsnr_stays_in_range_at_the_ends_of_u(monkeypatch):
    # u = 0, the smallest and largest float32 uniforms, 1/2: λ stays in [λ_min, λ_max] in float32.
    u = torch.tensor([0.0, 2 ** -24, 0.5, 1 - 2 ** -24], dtype=torch.float32)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: u.clone())
    logsnr = train.sample_logsnr(4, "cosine")
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    expected = -2 * np.log(np.tan(a * u.double().numpy() + b))  # float64 reference
    assert logsnr.min() >= -20.0 and logsnr.max() <= 20.0
    np.testing.assert_allclose(logsnr.numpy(), expected, atol=0.02)
    with pytest.raises(ValueError):
        train.sample_logsnr(4, "linear")


# ------------------------------------------------------------------ Alg. 1, lines 3-7: the loss

class ToyMLP(torch.nn.Module):
    """ε_θ for 2-D points: any module with forward(z, logsnr, labels) and null_label works."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.null_label = num_classes
        self.label_emb = torch.nn.Embedding(num_classes + 1, 16)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 1 + 16, 32), torch.nn.SiLU(),
                                       torch.nn.Linear(32, 2))

    def forward(self, z, logsnr, labels):
        return self.net(torch.cat([z, logsnr[:, None] / 20, self.label_emb(labels)], dim=1))


def reference_loss(model, x, labels, p_uncond, generator):
    """Algorithm 1 by hand in float64, replaying the documented draws: ∅, λ uniforms, then ε."""
    B = x.shape[0]
    drop_label = torch.rand(B, generator=generator) < p_uncond
    labels = torch.where(drop_label, model.null_label, labels)
    u = torch.rand(B, generator=generator).double().numpy()
    b = math.atan(math.exp(-20 / 2))
    a = math.atan(math.exp(20 / 2)) - b
    logsnr = -2 * np.log(np.tan(a * u + b))  # λ = −2 log tan(a u + b)
    eps = torch.randn(x.shape, generator=generator).double()
    shape = (B,) + (1,) * (x.ndim - 1)
    alpha = torch.from_numpy(np.sqrt(1 / (1 + np.exp(-logsnr)))).reshape(shape)
    sigma = torch.from_numpy(np.sqrt(1 / (1 + np.exp(logsnr)))).reshape(shape)
    z = alpha * x.double() + sigma * eps  # z_λ = α_λ x + σ_λ ε
    eps_pred = model(z.float(), torch.from_numpy(logsnr).float(), labels).double()
    return ((eps_pred - eps) ** 2).mean().item(), labels


@pytest.mark.parametrize("kind", ["unet", "toy"])
def test_diffusion_loss_equals_a_hand_computation(kind):
    torch.manual_seed(0)
    if kind == "unet":
        model = UNet(PRESETS["digits"].network).eval()
        # Weights in the zero-initialised output layers too: ε_θ then depends on every input.
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        x, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6)
    else:
        model = ToyMLP()
        x, labels = torch.randn(64, 2), torch.arange(64) % 3
    seen = {}
    model.register_forward_pre_hook(lambda m, inputs: seen.update(labels=inputs[2]))
    loss = train.diffusion_loss(model, x, labels, model.null_label, p_uncond=0.3,
                                generator=torch.Generator().manual_seed(5))
    seen_labels = seen["labels"]
    expected, expected_labels = reference_loss(model, x, labels, 0.3,
                                               torch.Generator().manual_seed(5))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.equal(seen_labels, expected_labels)  # the same labels were dropped to ∅
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    from data import load_dataset, to_model_range
    torch.manual_seed(0)
    images, labels = load_dataset("digits")
    x, labels = to_model_range(images[:16]), labels[:16]
    model = UNet(PRESETS["digits"].network)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_with(seed):
        return train.diffusion_loss(model, x, labels, model.null_label,
                                    generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = loss_with(7).item()  # the same ∅, λ and ε before and after
    for step in range(15):
        loss = loss_with(100 + step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_with(7).item()
    assert before == pytest.approx(1.0, abs=0.1)  # the zero-initialised output predicts ε = 0
    assert after < 0.7 * before


def test_update_ema_is_the_exponential_moving_average():
    torch.manual_seed(0)
    model, ema = ToyMLP(), ToyMLP()
    expected = [p.detach().double().clone() for p in ema.parameters()]
    for decay in (0.5, 0.9, 0.99):
        for p in model.parameters():
            p.data.normal_()
        train.update_ema(ema, model, decay)
        expected = [decay * e + (1 - decay) * p.detach().double()
                    for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)


def test_train_step_is_warmup_loss_clipping_adam_and_ema_by_hand():
    """train_step against its recipe in float64: the rate warmed up to lr·(s+1)/warmup, the
    loss's gradient (same draws) clipped to norm grad_clip, Adam's first update
    θ − lr ĝ/(|ĝ| + ε), and the EMA with the ramped decay min(ema_decay, (1 + s)/(10 + s))."""
    torch.manual_seed(0)
    model, x, labels = ToyMLP(), torch.randn(32, 2), torch.arange(32) % 3
    ema, ref = copy.deepcopy(model), copy.deepcopy(model)
    args = argparse.Namespace(p_uncond=0.2, logsnr_schedule="cosine", guidance_free=False,
                              lr=0.01, warmup_steps=4, grad_clip=0.05, ema_decay=0.9,
                              ema_warmup=True, amp=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 2
    torch.manual_seed(11)
    loss = train.train_step(model, ema, optimizer, x, labels, model.null_label, step, args)

    torch.manual_seed(11)  # the same draws of ∅, λ and ε
    ref_loss = train.diffusion_loss(ref, x, labels, ref.null_label, args.p_uncond)
    grads = [g.double() for g in torch.autograd.grad(ref_loss, list(ref.parameters()))]
    norm = math.sqrt(sum((g ** 2).sum().item() for g in grads))
    assert norm > args.grad_clip  # so the clipping is exercised
    lr = args.lr * (step + 1) / args.warmup_steps
    decay = min(args.ema_decay, (1 + step) / (10 + step))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and not loss.requires_grad
    for p, p_ema, p0, g in zip(model.parameters(), ema.parameters(), ref.parameters(), grads):
        g = g * args.grad_clip / (norm + 1e-6)
        theta = p0.detach().double() - lr * g / (g.abs() + 1e-8)  # Adam's 1st step: m̂ = g, v̂ = g²
        torch.testing.assert_close(p.detach().double(), theta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_ema.double(),
                                   decay * p0.detach().double() + (1 - decay) * theta,
                                   rtol=1e-5, atol=1e-6)


def test_data_order_is_a_permutation_per_epoch_and_step_seeds_differ():
    a, b = train.epoch_permutation(1797, 0, 0), train.epoch_permutation(1797, 0, 1)
    assert torch.equal(a.sort().values, torch.arange(1797)) and not torch.equal(a, b)
    assert torch.equal(a, train.epoch_permutation(1797, 0, 0))
    seeds = {train.step_seed(s, step, rank)
             for s in range(3) for step in range(100) for rank in range(4)}
    assert len(seeds) == 1200


# ------------------------------------------------------------------ the script: checkpoints, resume

@pytest.mark.slow
def test_checkpoint_round_trip(reference):
    out, result = reference
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))  # weights_only=True
    assert ckpt["step"] == STEPS and ckpt["args"]["dataset"] == "digits"
    assert ckpt["args"]["seed"] == 3
    assert ckpt["config"] == dataclasses.asdict(PRESETS["digits"].network)
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert ckpt["losses"].shape == (STEPS,) and torch.isfinite(ckpt["losses"]).all()
    assert ckpt["losses"][-5:].mean() < ckpt["losses"][:5].mean()
    for weights in ("model", "ema"):
        model = model_from_checkpoint(ckpt, weights)
        for name, value in model.state_dict().items():
            assert torch.equal(value, ckpt[weights][name])
    # The EMA is an average, not a copy; the optimizer state loads into a fresh Adam.
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    optimizer = torch.optim.Adam(UNet(PRESETS["digits"].network).parameters())
    optimizer.load_state_dict(ckpt["optimizer"])
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    # Each unwritable preview was a one-line warning and the run went on to the end.
    warnings = [line for line in result.stderr.splitlines() if "warning: no preview grid" in line]
    assert len(warnings) == 3 and "Traceback" not in result.stderr  # steps 10, 20 and the last
    assert not [f for f in os.listdir(out) if ".tmp" in f or f == train.LOCK_FILE]  # none left
    # --json: the run's figures; final_loss is the mean of the last --log-every (5) losses.
    report = json.loads((out / "run.json").read_text())
    assert report["steps"] == report["steps_this_run"] == STEPS and report["processes"] == 1
    assert math.isfinite(report["final_loss"])
    assert report["final_loss"] == pytest.approx(ckpt["losses"][-5:].double().mean().item(),
                                                 rel=1e-6)
    assert report["images_per_second"] > 0 and report["batch_size"] == 16
    assert os.path.samefile(report["checkpoint"], out / "ckpt.pt")


@pytest.mark.slow
def test_resume_continues_exactly(reference, tmp_path):
    out = str(tmp_path)
    first = run_train(RUN + ["--max-steps", "13", "--out-dir", out])  # stops between checkpoints
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 13
    second = run_train(RUN + ["--max-steps", str(STEPS), "--out-dir", out, "--resume"])
    assert second.returncode == 0, second.stderr
    assert "--max-steps was 13" in second.stdout  # the changed flag is reported
    assert_same_state(load_checkpoint(os.path.join(out, "ckpt.pt")),
                      load_checkpoint(os.path.join(reference[0], "ckpt.pt")))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args):
    """python -m torch.distributed.run with two CPU processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *RUN, *args,
            "--device", "cpu"]


# Each process keeps a handle on its parameters (through the gradient clipping call) and
# writes them to params_rank<r>.pt when train.main returns.
DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
params = []
clip = torch.nn.utils.clip_grad_norm_
def keep_params(parameters, *args, **kwargs):
    params[:] = list(parameters)
    return clip(params, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = keep_params
train.main(sys.argv[1:])
torch.save([p.detach() for p in params],
           os.path.join({out!r}, "params_rank" + os.environ["RANK"] + ".pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO, out=out))
    steps = 6
    command = torchrun(str(script), "--max-steps", str(steps), "--out-dir", out,
                       "--sample-every", str(steps), "--sample-steps", "4")
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(os.path.join(out, f"params_rank{r}.pt")) for r in (0, 1))
    names = [name for name, _ in UNet(PRESETS["digits"].network).named_parameters()]
    assert len(rank0) == len(rank1) == len(names)
    for p0, p1 in zip(rank0, rank1):
        assert torch.equal(p0, p1)  # DDP averages the gradients: every rank takes the same step
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == steps
    for p0, name in zip(rank0, names):
        assert torch.equal(p0, ckpt["model"][name])
    # Only rank 0 wrote files: a checkpoint, a preview grid, a loss curve (and the test dumps).
    expected = {"ckpt.pt", "loss.png", "params_rank0.pt", "params_rank1.pt",  # no train.lock
                f"samples_{steps:07d}.png"}
    assert set(os.listdir(out)) == expected
    assert result.stdout.count("train.py: digits") == 1  # settings printed once


@pytest.mark.slow
def test_torchrun_stops_every_process_when_the_out_dir_is_taken(tmp_path):
    """Rank 0 alone takes the lock; when it cannot, every rank exits with 2 (none waits)."""
    out = str(tmp_path / "ddp")
    held, error = cli.lock_out_dir(out, train.LOCK_FILE, "train.py")  # this process holds it
    assert error is None
    command = torchrun(os.path.join(REPO, "train.py"), "--max-steps", "2", "--out-dir", out)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV,
                            cwd=REPO)
    held.close()
    assert result.returncode != 0
    message = (f"train.py: error: --out-dir {out} is in use by another train.py "
               f"(process {os.getpid()} ")
    assert result.stderr.count(message) == 1
    # The first rank to leave exits with 2 (torchrun stops the other); no traceback from train.py.
    assert "exitcode  : 2" in result.stderr and 'train.py", line' not in result.stderr
    assert sorted(os.listdir(out)) == ["train.lock"]


# ------------------------------------------------------------------ image folders

@pytest.mark.parametrize("preset", ["digits", "mnist", "cifar10"])
def test_fit_config_is_the_preset_at_its_own_size_and_keeps_attention_levels(preset):
    config = PRESETS[preset].network
    size = config.image_size
    assert presets.fit_config(config, size, config.in_channels, config.num_classes) == config
    fitted = presets.fit_config(config, 2 * size, 1, 3)
    assert (fitted.image_size, fitted.in_channels, fitted.num_classes) == (2 * size, 1, 3)
    assert fitted.attention_resolutions == tuple(2 * r for r in config.attention_resolutions)
    assert ((fitted.channels, fitted.channel_mult, fitted.dropout)
            == (config.channels, config.channel_mult, config.dropout))


def test_fit_config_rounds_odd_sizes_up_as_the_unet_does():
    # mnist: levels 28, 14, 7 with attention at 7
    fitted = presets.fit_config(PRESETS["mnist"].network, 30, 3, 4)
    assert fitted.attention_resolutions == (8,)  # levels 30, 15, 8
    model = UNet(fitted)
    attention_levels = [block.attn.__class__.__name__ for block in model.down
                        if hasattr(block, "attn")]
    assert attention_levels.count("Attention") == 1  # one down block (8×8) attends, as at 7×7
    eps = model(torch.randn(2, 3, 30, 30), torch.zeros(2), torch.tensor([0, 4]))
    assert eps.shape == (2, 3, 30, 30)


@pytest.mark.slow
def test_imagefolder_run_trains_on_the_folder_and_stores_its_class_names(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("zebra", "ant", "bee"):  # sorted: ant, bee, zebra
        for i in range(4):
            path = tmp_path / "images" / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (12, 10), dtype=np.uint8)  # grayscale, 10×12
            Image.fromarray(pixels).save(path)
    (tmp_path / "images" / "test").mkdir()  # a broken test split: training never reads it
    out = str(tmp_path / "out")
    args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
            "--image-size", "8", "--batch-size", "4", "--max-steps", "2", "--sample-every", "0",
            "--out-dir", out]
    env = {data.CACHE_ENV: str(tmp_path / "cache")}
    result = run_train(args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("centre-cropped to square and resized") == 1
    assert "imagefolder, 12 images (1, 8, 8) of 3 classes" in result.stdout
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["class_names"] == ["ant", "bee", "zebra"]
    fitted = presets.fit_config(PRESETS["mnist"].network, 8, 1, 3)
    assert ckpt["config"] == dataclasses.asdict(fitted)
    assert ckpt["args"]["preset"] == "mnist" and ckpt["args"]["lr"] == PRESETS["mnist"].recipe.lr
    eps = model_from_checkpoint(ckpt)(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.tensor([3]))
    assert eps.shape == (1, 1, 8, 8)
    assert len(os.listdir(tmp_path / "cache")) == 1
    # A class folder added before --resume changes the model: one line, exit 2.
    cat = tmp_path / "images" / "train" / "cat"
    cat.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(cat / "0.png")
    resumed = run_train(args + ["--max-steps", "3", "--resume"], env=env)
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1].startswith("train.py: error: --resume")
    assert "num_classes 3 -> 4" in resumed.stderr


def test_training_asks_data_py_for_the_training_split_only(tmp_path, monkeypatch, capsys):
    calls = []

    def record(name, data_dir, train=True, **kwargs):
        calls.append((name, train))
        raise data.DataError("recorded")
    monkeypatch.setattr(data, "load_dataset", record)
    for name in ("cifar10", "imagefolder"):
        with pytest.raises(SystemExit):
            train.main(["--dataset", name, "--out-dir", str(tmp_path / name)])
    assert calls == [("cifar10", True), ("imagefolder", True)]
    assert capsys.readouterr().err.count("train.py: error: recorded") == 2

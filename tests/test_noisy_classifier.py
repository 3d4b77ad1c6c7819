"""noisy_classifier.py and classifier guidance against independent references.

- The identity of the paper's section 3, on a three-class 2-D Gaussian mixture with a shared
  full covariance: the exact classifier log p(c | z_λ) (solved with the full Σ_λ),
  differentiated by autograd inside guidance.classifier_guided_eps, equals CFG
  (guidance.guided_eps) with the exact ε* (test_sample.py's MixtureEps, in Σ's eigenbasis) at
  41 λ, several w, both bases; then every sampler gives the same samples with either rule.
- The autograd gradient through the real NoisyClassifier against central differences, float64.
- The rule plugs into every sampler with the real networks.
- band_accuracy against a stub of known accuracy; the noisy_classifier.py script (20 steps) and its
  bad inputs; sample.py --guidance classifier against the library call, and its errors.
"""
import dataclasses
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_exit_2
from test_sample import MixtureEps

import guidance as G
import model as M
import noisy_classifier as C
import sample as SM
from presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(net, seed):
    """Random weights in the zero-initialised layers too (a zero head: p_φ uniform, ∇ = 0)."""
    torch.manual_seed(seed)
    for p in net.parameters():
        if not p.any():
            p.data.normal_(0, 0.1)
    return net.eval()


# ---------------------------------------------------------------- the identity, exact scores

MEANS = [[1.0, 0.0], [-0.5, 0.8], [-0.3, -1.0]]
COV = [[0.3, 0.1], [0.1, 0.2]]
F64 = torch.float64


class ExactClassifier(torch.nn.Module):
    """log p(c | z_λ) + const = −½ (z − α m_c)ᵀ Σ_λ⁻¹ (z − α m_c), Σ_λ = α² Σ + σ² I: Bayes
    with q(z_λ | c) = N(α m_c, Σ_λ) (equal priors), the full 2×2 matrix solved in float64."""

    def __init__(self, means, cov):
        super().__init__()
        self.means, self.cov = torch.tensor(means, dtype=F64), torch.tensor(cov, dtype=F64)

    def forward(self, z, logsnr):
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(len(z))
        alpha2, sigma2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)  # (B,)
        cov = alpha2[:, None, None] * self.cov + sigma2[:, None, None] * torch.eye(2, dtype=F64)
        diff = z.double()[:, None, :] - alpha2.sqrt()[:, None, None] * self.means  # (B, K, D)
        # Σ_λ⁻¹ (z − α m_c), (B, K, D)
        solved = torch.linalg.solve(cov[:, None], diff[..., None])[..., 0]
        return -0.5 * (diff * solved).sum(-1)  # (B, K)


def toy_batch(n_per_logsnr=24, seed=0):
    """z_λ ~ q(z_λ | c) at 41 λ in [−20, 20] (a few far out), labels, per-example λ; float64."""
    g = torch.Generator().manual_seed(seed)
    logsnr = torch.linspace(-20, 20, 41, dtype=F64).repeat_interleave(n_per_logsnr)
    labels = torch.randint(0, 3, (len(logsnr),), generator=g)
    chol = torch.linalg.cholesky(torch.tensor(COV, dtype=F64))  # x | c = m_c + L e, L Lᵀ = Σ
    e = torch.randn(len(logsnr), 2, generator=g, dtype=F64)
    x = torch.tensor(MEANS, dtype=F64)[labels] + e @ chol.T
    alpha, sigma = torch.sigmoid(logsnr).sqrt()[:, None], torch.sigmoid(-logsnr).sqrt()[:, None]
    z = alpha * x + sigma * torch.randn(len(logsnr), 2, generator=g, dtype=F64)
    z[::7] *= 3  # some points far from every class
    return z, logsnr, labels


@pytest.mark.parametrize("base", ["uncond", "cond"])
def test_classifier_guidance_with_the_exact_classifier_is_cfg_with_exact_scores(base):
    """ε*(z) − (1 + w) σ ∇ log p(c|z) and ε*(z, c) − w σ ∇ log p(c|z) both equal
    (1 + w) ε*(z, c) − w ε*(z) at every λ, for scalar and per-example w (PAPER.md)."""
    eps_star, exact = MixtureEps(MEANS, COV), ExactClassifier(MEANS, COV)
    z, logsnr, labels = toy_batch()
    rule = functools.partial(G.classifier_guided_eps, classifier=exact, base=base)
    # The test can fail: the classifier term σ ∇ log p(c|z) = ε*(z) − ε*(z, c) is large.
    diff = eps_star(z, logsnr, labels) - eps_star(z, logsnr, torch.full_like(labels, 3))
    assert diff.abs().max() > 1.0
    per_example = torch.linspace(-2, 5, len(z), dtype=F64)
    for w in [-1.0, 0.0, 0.3, 1.0, 4.0, per_example]:
        with torch.no_grad():  # as sample() calls it
            got = rule(eps_star, z, logsnr, labels, w)
        ref = G.guided_eps(eps_star, z, logsnr, labels, w)
        assert got.dtype == F64 and not got.requires_grad
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


def test_classifier_gradient_is_the_implicit_classifier_gradient():
    """∇_z log p(c | z_λ) by autograd = −(ε*(z, c) − ε*(z)) / σ_λ (where σ_λ is not tiny)."""
    eps_star, exact = MixtureEps(MEANS, COV), ExactClassifier(MEANS, COV)
    z, logsnr, labels = toy_batch(seed=1)
    keep = logsnr < 10
    z, logsnr, labels = z[keep], logsnr[keep], labels[keep]
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None]
    eps_uncond = eps_star(z, logsnr, torch.full_like(labels, 3))
    ref = -(eps_star(z, logsnr, labels) - eps_uncond) / sigma
    torch.testing.assert_close(G.classifier_grad(exact, z, logsnr, labels), ref,
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("base", ["uncond", "cond"])
def test_every_sampler_gives_the_same_samples_with_either_rule(base, float64_default):
    """Algorithm 2 (and DDIM, DPM-Solver++(2M)) with the exact classifier's guidance against
    CFG with exact ε*: the same noise gives the same samples, for per-example w."""
    eps_star, exact = MixtureEps(MEANS, COV), ExactClassifier(MEANS, COV)
    labels, w = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, -1.0])
    rule = functools.partial(G.classifier_guided_eps, classifier=exact, base=base)
    for sampler in SM.SAMPLERS:
        def run(guidance):
            return SM.sample(eps_star, labels, w, steps=12, sampler=sampler, clip_x=False,
                             shape=(2,), guidance=guidance,
                             generator=torch.Generator().manual_seed(3))
        x_cg, x_cfg = run(rule), run(G.guided_eps)
        torch.testing.assert_close(x_cg, x_cfg, rtol=1e-8, atol=1e-9)
        # Different w, different samples: not a vacuous check.
        assert (x_cfg[3] - x_cfg[0]).abs().max() > 0.1


# ---------------------------------------------------------------- the real classifier

class ZeroEps(torch.nn.Module):
    """ε_θ ≡ 0, so that the rule returns −(scale) σ_λ ∇ log p_φ alone."""

    null_label = 10

    def forward(self, z, logsnr, labels):
        return torch.zeros_like(z)


def test_autograd_gradient_matches_central_finite_differences():
    """∇_z log p_φ(c | z_λ) through classifier_guided_eps (no_grad, batched) against central
    differences of log_softmax(p_φ) per sample in float64, every pixel; p_φ gets no gradient."""
    clf = perturbed(M.NoisyClassifier(PRESETS["digits"].guide), seed=0).double()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    logsnr, labels = torch.tensor([-3.0, 0.5, 4.0], dtype=F64), torch.tensor([2, 7, 5])
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
    rule = functools.partial(G.classifier_guided_eps, ZeroEps(), z, logsnr, labels,
                             classifier=clf)
    with torch.no_grad():
        uncond, cond = rule(1.0, base="uncond"), rule(2.0, base="cond")
    grad = -uncond / (2 * sigma)  # ε̂ = 0 − (1 + w) σ ∇ log p, w = 1
    # ε̂ = 0 − w σ ∇ log p, w = 2
    torch.testing.assert_close(-cond / (2 * sigma), grad, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in clf.parameters())

    h, D = 1e-5, 64
    for b in range(3):
        steps = torch.eye(D, dtype=F64).reshape(D, 1, 8, 8) * h
        batch = torch.cat([z[b] + steps, z[b] - steps])  # (2D, 1, 8, 8)
        with torch.no_grad():
            log_p = torch.log_softmax(clf(batch, logsnr[b].expand(2 * D)), dim=1)[:, labels[b]]
        fd = ((log_p[:D] - log_p[D:]) / (2 * h)).reshape(1, 8, 8)
        assert fd.abs().max() > 1e-2  # a gradient worth checking
        torch.testing.assert_close(grad[b], fd, rtol=0, atol=1e-7 * fd.abs().max().item())


@pytest.mark.parametrize("base", ["uncond", "cond"])
def test_the_rule_plugs_into_every_sampler_with_the_real_networks(base):
    unet = perturbed(M.UNet(PRESETS["digits"].network), seed=2).requires_grad_(False)
    clf = perturbed(M.NoisyClassifier(PRESETS["digits"].guide), seed=3)
    rule = functools.partial(G.classifier_guided_eps, classifier=clf, base=base)
    labels, w = torch.tensor([1, 7, 3]), torch.tensor([0.0, 2.0, -1.0])
    for sampler in SM.SAMPLERS:
        x = SM.sample(unet, labels, w, steps=3, sampler=sampler, guidance=rule,
                      generator=torch.Generator().manual_seed(0))
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and not x.requires_grad
        x_cfg = SM.sample(unet, labels, w, steps=3, sampler=sampler,
                          generator=torch.Generator().manual_seed(0))
        assert (x - x_cfg)[1].abs().max() > 1e-3  # at w = 2 the classifier moved the samples
    assert all(p.grad is None for p in clf.parameters())
    with pytest.raises(ValueError, match="unknown base"):
        G.classifier_guided_eps(unet, torch.zeros(1, 1, 8, 8), torch.zeros(1), labels[:1], 1.0,
                                classifier=clf, base="conditional")


def test_band_accuracy_draws_logsnr_in_each_band_and_counts_hits():
    """A stub that always answers class 0 and records its λ: accuracy = the share of class 0,
    every λ lies in its band; the network sees z_λ = α x + σ ε of the images in [−1, 1]."""
    seen = []

    class AlwaysZero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, logsnr):
            seen.append((z.clone(), logsnr.clone()))
            return torch.tensor([1.0, 0.0, 0.0]).expand(len(z), 3)

    labels = torch.tensor([0, 1, 2, 0, 0, 2, 1, 0, 2, 2])
    images = torch.full((10, 1, 4, 4), 255, dtype=torch.uint8)  # x = 1 everywhere
    bands = [(-20, -5), (2, 5), (5, 20)]
    acc = C.band_accuracy(AlwaysZero(), images, labels, bands, batch_size=4)
    assert acc == [0.4] * 3
    assert len(seen) == 9  # three batches (4, 4, 2) per band
    for k, (lo, hi) in enumerate(bands):
        lams = torch.cat([lam for _, lam in seen[3 * k:3 * k + 3]])
        assert len(lams) == 10 and lams.min() >= lo and lams.max() < hi
    z, lam = seen[-1]  # λ ≥ 5: z ≈ x = 1 up to noise σ ≤ 0.08
    assert (z - 1).abs().max() < 0.5


# ---------------------------------------------------------------- noisy_classifier.py: the script


def run_classifier(args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "noisy_classifier.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step digits run of the script: its output folder and the finished process."""
    out = tmp_path_factory.mktemp("classifier")
    proc = run_classifier(["--dataset", "digits", "--max-steps", "20", "--batch-size", "16",
                           "--log-every", "10", "--ckpt-every", "10", "--seed", "1",
                           "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_script_writes_a_checkpoint_that_loads(trained):
    out, proc = trained
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]  # no temporary files left
    clf, ckpt = M.load_model(str(out / "ckpt.pt"))
    assert ckpt["step"] == 20 and ckpt["args"]["dataset"] == "digits"
    assert ckpt["args"]["holdout"] == 20
    assert ckpt["config"] == dataclasses.asdict(PRESETS["digits"].guide)
    assert ckpt["bands"] == [list(b) for b in C.BANDS]
    assert len(ckpt["band_accuracy"]) == len(C.BANDS)
    assert all(0 <= a <= 1 for a in ckpt["band_accuracy"])
    assert not clf.training and clf(torch.zeros(2, 1, 8, 8), torch.zeros(2)).shape == (2, 10)
    raw = M.model_from_checkpoint(ckpt, "model").state_dict()
    assert any(not torch.equal(v, raw[k]) for k, v in clf.state_dict().items())  # EMA ≠ raw
    assert sum("λ in [" in line for line in proc.stdout.splitlines()) == len(C.BANDS)
    assert ckpt["network"] == "classifier" and isinstance(clf, M.NoisyClassifier)
    # Written before checkpoints named their network:
    older = {k: v for k, v in ckpt.items() if k != "network"}
    assert M.network_kind(older) == "classifier"
    assert isinstance(M.model_from_checkpoint(older), M.NoisyClassifier)
    assert "200), held out" in proc.stdout  # 20 held-out digits per class


BAD_SCRIPT = [  # (arguments, a word the message must contain)
    (["--max-steps", "0"], "must be positive"),
    (["--batch-size", "x"], "invalid int"),
    (["--lr", "0"], "must be positive"),
    (["--seed", "-1"], "0 or more"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--batch-size", "100000"], "larger than"),
    (["--holdout", "500"], "cannot hold out 500"),
    (["--out-dir", "{tmp}/a_file/sub"], "cannot write"),
    (["--out-dir", "{tmp}/done"], "exists"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")])


@pytest.mark.parametrize("argv,word", BAD_SCRIPT, ids=[" ".join(a) for a, _ in BAD_SCRIPT])
def test_script_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv, word):
    monkeypatch.chdir(tmp_path)  # the default out/classifier-noisy/<dataset> lands here
    (tmp_path / "a_file").write_text("")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "ckpt.pt").write_text("")
    argv = ["--dataset", "digits", "--max-steps", "1", *[a.format(tmp=tmp_path) for a in argv]]
    err = assert_one_line_exit_2(C.main, argv, capsys, "noisy_classifier.py: error:")
    assert word in err, err


# ---------------------------------------------------------------- sample.py --guidance classifier


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A digits diffusion checkpoint and a classifier one, as the scripts write them (random
    weights, no training), and classifiers that do not fit."""
    d = tmp_path_factory.mktemp("sample_ckpts")
    unet = perturbed(M.UNet(PRESETS["digits"].network), seed=4)
    state = unet.state_dict()
    M.save_checkpoint({"model": state, "ema": state, "step": 0, "args": {"dataset": "digits"},
                       "config": dataclasses.asdict(unet.config)}, str(d / "diffusion.pt"))
    clf = perturbed(M.NoisyClassifier(PRESETS["digits"].guide), seed=5)
    state = clf.state_dict()
    good = {"network": "classifier", "config": dataclasses.asdict(clf.config), "model": state,
            "ema": state, "step": 0, "args": {"dataset": "digits"}}
    M.save_checkpoint(good, str(d / "clf.pt"))
    M.save_checkpoint({**good, "args": {"dataset": "mnist"}}, str(d / "clf_mnist.pt"))
    for name, change in [("size", dict(image_size=28)), ("channels", dict(in_channels=3)),
                         ("classes", dict(num_classes=5))]:
        config = dataclasses.replace(PRESETS["digits"].guide, **change)
        state = M.NoisyClassifier(config).state_dict()
        M.save_checkpoint({**good, "config": dataclasses.asdict(config), "model": state,
                           "ema": state}, str(d / f"clf_{name}.pt"))
    # As metrics.py writes:
    M.save_checkpoint({"model": state, "config": {"in_channels": 1}}, str(d / "no_ema.pt"))
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    return d


CLF = ["--guidance", "classifier", "--guide-ckpt"]
NEEDS = "needs --guide-ckpt with a NoisyClassifier (noisy_classifier.py), got"
BAD_SAMPLE = [
    (["--guidance", "classifier"], f"{NEEDS} nothing"),
    (["--guide-ckpt", "{d}/clf.pt"], "--guide-ckpt goes with a rule that takes a second network"),
    (["-p", "base=cond"], "--guidance cfg takes no parameters"),
    (CLF + ["{d}/clf.pt", "-p", "base=both"], "unknown base 'both'"),
    (["--guidance", "classifier-free"], "invalid choice"),
    (CLF + ["{d}/missing.pt"], "no checkpoint"),
    (CLF + ["{d}/garbage.pt"], "not a readable checkpoint"),
    (CLF + ["{d}/no_ema.pt"], "no 'config' or 'ema'"),
    (CLF + ["{d}/diffusion.pt"], f"{NEEDS} UNet"),
    (["--guidance", "autoguidance", "--guide-ckpt", "{d}/clf.pt"],
     "with a UNet (train.py), got NoisyClassifier"),
    (["--ckpt", "{d}/clf.pt"], "is a NoisyClassifier, not a diffusion model"),
    (CLF + ["{d}/clf_mnist.pt"], "has dataset 'mnist' but"),
    (CLF + ["{d}/clf_size.pt"], "has image size 28 but"),
    (CLF + ["{d}/clf_channels.pt"], "has channels 3 but"),
    (CLF + ["{d}/clf_classes.pt"], "has number of classes 5 but"),
]


@pytest.mark.parametrize("argv,word", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_sample_bad_classifier_input_exits_2_with_one_line(ckpts, tmp_path, capsys, argv, word):
    args = ["--ckpt", f"{ckpts}/diffusion.pt", "--steps", "2", "--out", str(tmp_path / "s.png")]
    args += [a.format(d=ckpts) for a in argv]
    err = assert_one_line_exit_2(SM.main, args, capsys, "sample.py: error:")
    assert word in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sample_cli_classifier_guidance_end_to_end(ckpts, tmp_path):
    """From the shell: grid and npz written. In-process: each base gives exactly the images of
    sample() with classifier_guided_eps and that base (same per-image seeds), and where
    classifier guidance reduces to the model (cond at w = 0, uncond at w = −1) --guidance cfg's."""
    common = ["--ckpt", f"{ckpts}/diffusion.pt", "--classes", "0,3,8", "--n-per-class", "2",
              "--steps", "3", "--sampler", "ddim", "--seed", "5"]
    clf_args = CLF + [f"{ckpts}/clf.pt"]
    proc = subprocess.run([sys.executable, "sample.py", *common, *clf_args, "--w", "0", "2",
                           "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")],
                          cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    npz = np.load(tmp_path / "a.npz")
    assert npz["images"].shape == (12, 8, 8, 1) and npz["w"].tolist() == [0.0] * 6 + [2.0] * 6

    def cli(name, *extra):
        SM.main(common + ["--out", str(tmp_path / f"{name}.png"),
                          "--npz", str(tmp_path / f"{name}.npz"), *extra])
        return np.load(tmp_path / f"{name}.npz")["images"]

    unet = M.model_from_checkpoint(M.load_checkpoint(f"{ckpts}/diffusion.pt")).eval()
    clf = M.load_model(f"{ckpts}/clf.pt")[0]
    labels = torch.tensor([0, 0, 3, 3, 8, 8] * 2)
    seeds = [int(np.random.SeedSequence([5, c, j]).generate_state(1)[0])
             for c in (0, 3, 8) for j in (0, 1)] * 2
    for base in ("uncond", "cond"):
        w = torch.tensor([0.5] * 6 + [3.0] * 6)
        rule = functools.partial(G.classifier_guided_eps, classifier=clf, base=base)
        x = SM.sample(unet, labels, w, 3, "ddim", guidance=rule,
                      generator=[torch.Generator().manual_seed(s) for s in seeds])
        ours = SM.to_uint8(x).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(cli(base, *clf_args, "-p", f"base={base}", "--w", "0.5", "3"), ours)
    assert np.array_equal(cli("c0", *clf_args, "-p", "base=cond", "--w", "0"),
                          cli("f0", "--w", "0"))  # both are ε_θ(z, c), one pass
    # Both are ε_θ(z): a batch of B against one of 2B.
    u1, f1 = cli("u1", *clf_args, "--w", "-1"), cli("f1", "--w", "-1")
    assert np.abs(u1.astype(int) - f1.astype(int)).max() <= 1

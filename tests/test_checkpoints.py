"""The shipped models in checkpoints/: the files the manifest and README name, byte for byte,
each read weights-only and sampled, each U-Net's samples recognised by a judge it never saw."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from conftest import REPO, judge

import guidance as guidance_lib
import metric_nets
import model as model_lib
import sample as sample_lib

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = os.path.join(REPO, "checkpoints")
# What the docs show: the CFG U-Nets, the metrics classifiers and p_φ (every U-Net in the manifest,
# the guidance-free ones and the one without the null label too, is sampled by the tests below).
EXPECTED = {"digits", "mnist-4k", "fashion-mnist", "cifar10-cpu", "mnist-4k-gft",
            "fashion-mnist-gft", "mnist-4k-p0", "metrics-mnist", "metrics-fashion-mnist",
            "metrics-cifar10", "noisy-classifier-mnist-4k"}
with open(os.path.join(SHIPPED, "manifest.json")) as f:
    MANIFEST = json.load(f)
UNETS = sorted(n for n, e in MANIFEST.items() if "U-Net" in e["kind"])


def test_the_manifest_names_every_file_and_the_docs_models():
    files = {f[:-3] for f in os.listdir(SHIPPED) if f.endswith(".pt")}
    assert files == set(MANIFEST) and EXPECTED <= files


def test_each_scores_file_names_the_file_it_scored():
    # checkpoints/scores/NAME.json: the 1,000-per-w scores live_study prints beside its own; a
    # model shipped again without being scored again would leave them describing another file.
    folder = os.path.join(SHIPPED, "scores")
    for file in os.listdir(folder):
        with open(os.path.join(folder, file)) as f:
            scores = json.load(f)
        name = file[:-len(".json")]
        assert scores["model"] == name and scores["checkpoint_sha256"] == MANIFEST[name]["sha256"]
        assert all(row["n"] >= 1000 for row in scores["rows"]) and scores["real"]["n"] >= 1000


def test_the_readme_gives_the_sha256_of_the_manifest_and_each_scores_file():
    with open(os.path.join(SHIPPED, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    files = ["manifest.json"] + [f"scores/{f}" for f in os.listdir(os.path.join(SHIPPED, "scores"))]
    for file in files:
        with open(os.path.join(SHIPPED, file), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert f"| `{file}` |" in readme and f"`{digest}`" in readme, file


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_file_matches_its_sha256_size_and_readme(name):
    path = os.path.join(SHIPPED, f"{name}.pt")
    with open(path, "rb") as f:
        content = f.read()
    digest = hashlib.sha256(content).hexdigest()
    assert digest == MANIFEST[name]["sha256"] and len(content) == MANIFEST[name]["bytes"]
    assert len(content) <= 8e6
    with open(os.path.join(SHIPPED, "README.md")) as f:
        assert f"`{name}.pt`" in f.read().split(digest)[0].splitlines()[-1]  # its row
    torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only


def test_the_folder_stays_under_30_mb():
    assert sum(os.path.getsize(os.path.join(SHIPPED, f"{n}.pt")) for n in MANIFEST) <= 30e6


@pytest.mark.parametrize("name", UNETS)
def test_every_unet_samples_the_asked_class_when_guided(name):
    model, ckpt = model_lib.load_model(name)  # by its shipped name
    assert model_lib.checkpoint_path(name) == os.path.join(SHIPPED, f"{name}.pt")
    labels = torch.arange(10).repeat(3)
    rule = (guidance_lib.guidance_free_eps if ckpt["args"]["guidance_free"]
            else guidance_lib.icg_eps if ckpt["args"]["p_uncond"] == 0  # it never saw ∅
            else guidance_lib.guided_eps)
    x = sample_lib.sample(model, labels, 3.0, sampler=sample_lib.FAST_SAMPLER, guidance=rule,
                          generator=torch.Generator().manual_seed(0))
    images = sample_lib.to_uint8(x)
    accuracy = (judge(MANIFEST[name]["dataset"])(images) == labels).double().mean().item()
    assert accuracy >= (0.5 if MANIFEST[name]["dataset"] == "cifar10" else 0.8), accuracy


def test_the_noisy_classifier_recognises_the_shipped_model_s_digits():
    """p_φ, at a high λ, names the class of mnist-4k samples at w = 3 (which the metrics
    classifier recognises above); its weights are stored in float16 and read as float32."""
    classifier, _ = model_lib.load_model("noisy-classifier-mnist-4k")
    assert all(p.dtype == torch.float32 for p in classifier.parameters())
    model, _ = model_lib.load_model("mnist-4k")
    labels = torch.arange(10).repeat(3)
    x = sample_lib.sample(model, labels, 3.0, sampler=sample_lib.FAST_SAMPLER,
                          generator=torch.Generator().manual_seed(1))
    logsnr = torch.full((len(x),), 4.0)
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = (classifier(z, logsnr).argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.8, accuracy


def test_sample_py_and_metrics_py_take_the_shipped_names(tmp_path, monkeypatch, capsys):
    """`sample.py --ckpt cifar10-cpu` samples the shipped model; `metrics.py` without a trained
    classifier uses the shipped one and says so."""
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    sample_lib.main(["--ckpt", "cifar10-cpu", "--w", "0", "2", "--classes", "0,1",
                     "--n-per-class", "1", "--steps", "4", "--sampler", "ddim",
                     "--out", str(out), "--npz", str(npz)])
    assert out.exists() and np.load(npz)["images"].shape == (4, 32, 32, 3)
    monkeypatch.setattr(metric_nets, "REPO", str(tmp_path))  # no out/classifier/ there
    path = metric_nets.classifier_path("cifar10")
    assert path == os.path.join(SHIPPED, "metrics-cifar10.pt")
    assert "using the shipped" in capsys.readouterr().err
    assert metric_nets.classifier_path("cifar10", "metrics-mnist").endswith("metrics-mnist.pt")

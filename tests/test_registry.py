"""A new dataset is one data.DATASETS entry and a new preset one presets.PRESETS entry: added here
(a 3-class, 12×12 dataset in the official IDX format, and a network and recipe for it), train.py,
noisy_classifier.py (p_φ) and bench.py's flags take them with nothing else changed."""
import dataclasses
import hashlib
import os

import numpy as np
import pytest
import torch
from official_formats import idx_gz

import bench
import data
import noisy_classifier
import presets
import train
from model import ClassifierConfig, UNetConfig, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("circle", "square", "cross")


def toy_images(n_per_class, seed):
    """uint8 (N, 12, 12): a bright blob whose place is its class, on noise; labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    images = rng.integers(0, 60, (len(labels), 12, 12))
    for i, c in enumerate(labels):
        images[i, 4 * c:4 * c + 4, 4:8] = 220
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The files of the new dataset in tmp_path/toy/, and the two new entries."""
    folder = tmp_path / "toy"
    folder.mkdir()
    files = {}
    for train_split, (images, labels) in ((True, toy_images(20, 0)), (False, toy_images(5, 1))):
        pair = []
        for name, array in zip(data.IDX[:2] if train_split else data.IDX[2:], (images, labels)):
            (folder / name).write_bytes(idx_gz(array))
            pair.append((name, hashlib.md5((folder / name).read_bytes()).hexdigest()))
        files[train_split] = tuple(pair)
    dataset = data.Dataset("toy", CLASSES, (1, 12, 12), "toy-net", "idx", "https://example.org/",
                           files, holdout=2)
    preset = presets.Preset(
        "toy-net",
        UNetConfig(image_size=12, in_channels=1, channels=8, channel_mult=(1, 2),
                   num_res_blocks=1, attention_resolutions=(6,), dropout=0.0, num_classes=3),
        presets.Recipe(batch_size=8, lr=3e-3, warmup_steps=2, max_steps=3, log_every=1,
                       ckpt_every=3, sample_every=3, sample_steps=4),
        ClassifierConfig(image_size=12, in_channels=1, channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(), num_classes=3),
        presets.GuideRecipe(batch_size=8, lr=1e-3, max_steps=2, log_every=1, ckpt_every=2))
    monkeypatch.setitem(data.DATASETS, "toy", dataset)
    monkeypatch.setitem(presets.PRESETS, "toy-net", preset)
    return tmp_path, dataset, preset


def test_train_py_trains_a_new_dataset_with_its_new_preset(toy):
    root, dataset, preset = toy
    out = root / "out"
    train.main(["--dataset", "toy", "--data-dir", str(root), "--out-dir", str(out)])
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == preset.recipe.max_steps
    assert ckpt["config"] == dataclasses.asdict(preset.network)
    assert ckpt["class_names"] == list(CLASSES)
    stored = ckpt["args"]
    assert (stored["preset"], stored["lr"], stored["batch_size"]) == ("toy-net", 3e-3, 8)
    assert stored["holdout"] == dataset.holdout  # 18 of 20 per class trained on
    assert torch.isfinite(ckpt["losses"]).all()
    assert (out / "samples_0000003.png").stat().st_size > 0  # the preview, three rows of three


def test_noisy_classifier_py_trains_p_phi_of_the_new_preset(toy):
    root, _, preset = toy
    out = root / "p_phi"
    noisy_classifier.main(["--dataset", "toy", "--data-dir", str(root), "--out-dir", str(out)])
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["network"] == "classifier" and ckpt["step"] == preset.guide_recipe.max_steps
    assert ckpt["config"] == dataclasses.asdict(preset.guide)
    assert len(ckpt["band_accuracy"]) == len(noisy_classifier.BANDS)


def test_a_preset_is_found_for_the_images_it_fits(toy):
    _, dataset, preset = toy
    assert presets.fits(preset.network, dataset)
    assert not presets.fits(presets.PRESETS["mnist"].network, dataset)
    assert bench.preset_flags("toy-net") == ["--dataset", "toy", "--preset", "toy-net"]
    assert os.path.basename(train.parse_args(["--dataset", "toy"]).out_dir) == "toy"


def test_a_shipped_file_s_command_trains_it_again_bit_for_bit(toy, monkeypatch):
    """scripts/ship_checkpoints.py rebuilds the command that made a run from the arguments it
    stored; running that command again gives the very EMA weights that were shipped."""
    import shlex
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    import ship_checkpoints
    root, _, _ = toy
    shipped = root / "checkpoints"
    shipped.mkdir()
    markers = (ship_checkpoints.TABLE_START, ship_checkpoints.TABLE_END)
    (shipped / "README.md").write_text("\n".join(markers))
    monkeypatch.setattr(ship_checkpoints, "OUT", str(shipped))
    train.main(["--dataset", "toy", "--data-dir", str(root), "--out-dir", str(root / "a"),
                "--p-uncond", "0.2", "--no-ema-warmup", "--ema-decay", "0.5", "--max-steps", "4"])
    ship_checkpoints.main([f"toy-model={root / 'a' / 'ckpt.pt'}"])
    entry = ship_checkpoints.json.load(open(shipped / "manifest.json"))["toy-model"]
    words = shlex.split(entry["command"])
    assert words[:2] == ["python", "train.py"] and "--p-uncond" in words and entry["steps"] == 4
    train.main(words[2:] + ["--out-dir", str(root / "b")])
    again = load_checkpoint(str(root / "b" / "ckpt.pt"))["ema"]
    for key, value in load_checkpoint(str(shipped / "toy-model.pt"))["ema"].items():
        assert torch.equal(value, again[key]), key
    assert f"`{entry['sha256']}`" in (shipped / "README.md").read_text()

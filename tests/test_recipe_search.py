"""Tests for scripts/recipe_search.py: CIFAR-10's candidates train with train.py at 32×32 colour
to their milestones with the CPU settings they name; a candidate of the other image shape is
refused in one line; the report's minutes and scores come from the files it reads (steps × ms
per step, worked out here).

Run: python -m pytest -q tests/test_recipe_search.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "recipe_search.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import recipe_search as SEARCH  # noqa: E402

CHOSEN_CIFAR = "cifar-tiny"  # the candidate that presets.PRESETS["cifar10-cpu"] is


def recipe_search(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def cifar_folder(root, per_class=7):
    """root/train/<CIFAR-10 class>/<i>.png, 32×32 random colour (the JPEG CIFAR-10's layout),
    70 images: one batch of 64."""
    rng = np.random.default_rng(0)
    for name in data.DATASETS["cifar10"].classes:
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    return root


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_candidate_builds_at_its_image_shape_and_its_flags_parse(dataset):
    """A candidate that cannot be built (e.g. channels GroupNorm cannot split) fails here, not
    an hour into a search."""
    import train
    from model import UNet, UNetConfig
    shape = SEARCH.shape_fields(dataset)
    for name, (fields, flags) in SEARCH.candidates(dataset).items():
        net = UNet(UNetConfig(**shape, **fields)).eval()
        x = torch.zeros(2, shape["in_channels"], shape["image_size"], shape["image_size"])
        with torch.no_grad():
            out = net(x, torch.tensor([0.0, 1.0]), torch.tensor([0, shape["num_classes"]]))
        assert out.shape == x.shape, name
        train.parse_args(["--dataset", dataset, *flags])


@pytest.mark.slow
def test_a_cifar10_candidate_trains_at_32x32_colour_to_each_milestone_with_its_cpu_settings(
        tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    folder, out = cifar_folder(tmp_path / "cifar"), tmp_path / "recipes"
    run = recipe_search("train", "--dataset", "cifar10", "--data-dir", folder,
                        "--candidates", "cifar-tiny", "--train-steps", 1, 2, "--out", out)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in open(out / "trained.jsonl")]
    assert [(r["candidate"], r["dataset"], r["steps"]) for r in rows] == [
        ("cifar-tiny", "cifar10", 1), ("cifar-tiny", "cifar10", 2)]
    for r in rows:  # r["ckpt"]: relative to the repository
        ckpt = torch.load(os.path.join(REPO, r["ckpt"]), map_location="cpu", weights_only=False)
        assert ckpt["step"] == r["steps"]
        config = ckpt["config"]
        assert (config["image_size"], config["in_channels"], config["channels"]) == (32, 3, 16)
        # the candidate's CPU settings, not the cifar10 preset's DDPM ones (warm-up 5,000, no
        # EMA ramp, lr 2e-4)
        got = ckpt["args"]
        assert (got["warmup_steps"], got["ema_warmup"], got["lr"]) == (100, True, 2e-3)


def test_a_candidate_of_the_other_image_shape_is_refused_in_one_line(tmp_path):
    run = recipe_search("train", "--dataset", "cifar10", "--data-dir", tmp_path,
                        "--candidates", "tiny", "--out", tmp_path / "recipes")
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "not a cifar10 candidate: tiny" in last and "cifar-tiny" in last  # names the choice
    assert not (tmp_path / "recipes").exists()


@pytest.mark.slow
def test_the_report_takes_minutes_as_steps_times_ms_and_the_scores_at_each_asked_w(tmp_path):
    out = tmp_path / "recipes"
    out.mkdir()
    timings = {"cifar-small": {"ms_per_step": 750.0, "threads": 2}}
    json.dump(timings, open(out / "timings.json", "w"))
    config = dict(channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, dropout=0.1)
    floor = dict(fid=3.0, accuracy=0.9, **{"is": 9.0})
    with open(out / "results.jsonl", "w") as f:
        for steps, fid1, acc3 in ((800, 120.0, 0.512), (1600, 80.0, 0.806)):
            results = {"1.0": dict(fid=fid1, accuracy=0.3), "3.0": dict(fid=99.0, accuracy=acc3)}
            row = dict(candidate="cifar-small", dataset="cifar10", config=config, steps=steps,
                       n=1000, flags=["--batch-size", "64", "--lr", "1e-3"], params=1.5e6,
                       floor=floor, results=results)
            f.write(json.dumps(row) + "\n")
    report = ("report", "--dataset", "cifar10", "--data-dir", tmp_path, "--out", out)
    run = recipe_search(*report, "--report-w", 1, 3, "--plot", tmp_path / "plot.png")
    assert run.returncode == 0, run.stderr
    table = [line for line in run.stdout.splitlines() if line.startswith("| cifar-small")]
    # 800 steps × 750 ms = 10.0 min; 1600 steps = 20.0 min; FID and accuracy at w = 1, then w = 3
    assert [line.split(" | ")[5:] for line in table] == [
        ["800", "10.0", "120.0", "0.300", "99.0", "0.512 |"],
        ["1600", "20.0", "80.0", "0.300", "99.0", "0.806 |"]]
    assert (tmp_path / "plot.png").stat().st_size > 0
    missing = recipe_search(*report, "--report-w", 2, "--plot", tmp_path / "plot2.png")
    assert missing.returncode != 0
    assert "no results at w = 2.0" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_cifar10_cpu_preset_is_the_chosen_candidate_step_for_step(tmp_path, monkeypatch):
    """train.py --dataset cifar10 --preset cifar10-cpu trains the search's chosen candidate: the
    same network and settings, so the same weights after the same steps as its search run."""
    import train
    from model import load_checkpoint
    from presets import PRESETS
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    folder = cifar_folder(tmp_path / "cifar")
    searched = recipe_search("train", "--dataset", "cifar10", "--data-dir", folder,
                             "--candidates", CHOSEN_CIFAR, "--train-steps", 2,
                             "--out", tmp_path / "recipes")
    assert searched.returncode == 0, searched.stderr
    out = tmp_path / "preset"
    preset = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--dataset", "cifar10",
                             "--preset", "cifar10-cpu", "--data-dir", str(folder),
                             "--max-steps", "2", "--sample-every", "0", "--out-dir", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert preset.returncode == 0, preset.stderr
    a = load_checkpoint(str(tmp_path / "recipes" / "cifar10" / CHOSEN_CIFAR / "ckpt.pt"))
    b = load_checkpoint(str(out / "ckpt.pt"))
    assert a["config"] == b["config"]
    assert b["config"]["channels"] == PRESETS["cifar10-cpu"].network.channels
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], msg=f"{key}.{name}")
    # the candidate's flags are the preset's defaults; --dataset cifar10 alone stays DDPM's recipe
    recipe = train.parse_args(["--dataset", "cifar10", "--preset", "cifar10-cpu"])
    chosen_flags = SEARCH.CIFAR_CANDIDATES[CHOSEN_CIFAR][1]
    flags = train.parse_args(["--dataset", "cifar10", *chosen_flags])
    keys = ("batch_size", "lr", "warmup_steps", "ema_warmup", "ema_decay", "grad_clip")
    assert all(getattr(recipe, k) == getattr(flags, k) for k in keys)
    d = train.parse_args(["--dataset", "cifar10"])  # DDPM's
    assert (d.lr, d.warmup_steps, d.batch_size, d.preset) == (2e-4, 5000, 128, "cifar10")


def test_bench_measures_the_cifar10_cpu_preset_with_its_recipe_not_the_ddpm_one(tmp_path):
    """bench.py --presets cifar10-cpu: a preset that is not a dataset's name is timed with the
    settings train.py --dataset cifar10 --preset cifar10-cpu trains it with (batch 64, lr 2e-3),
    on its own network."""
    import bench
    from model import UNet
    from presets import PRESETS
    assert bench.preset_flags("cifar10-cpu") == ["--dataset", "cifar10", "--preset", "cifar10-cpu"]
    out = tmp_path / "bench.json"
    bench.main(["--presets", "cifar10-cpu", "--iters", "1", "--min-seconds", "0", "--no-sample",
                "--matmul-sizes", "64", "--json", str(out)])
    (row,) = json.loads(out.read_text())["train"]
    assert (row["preset"], row["batch_size"]) == ("cifar10-cpu", 64)
    # a training step is a forward F and a backward of about 2F of the preset's network at batch 64
    from torch.utils.flop_counter import FlopCounterMode
    config = PRESETS["cifar10-cpu"].network
    z, labels = torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        UNet(config)(z, torch.zeros(64), labels)
    assert 2.5 < row["flops_per_step"] / counter.get_total_flops() < 3.5

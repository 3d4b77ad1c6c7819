"""scripts/gpu_check.py on a CPU: its --dry-run end to end, its failures (exit code 1, one line).

The GPU check runs only when a GPU is lent, rarely; these tests keep it from rotting in between.
The dry run's JSON is checked against what the commands left on disk (checkpoints, npz, the JSON
each command wrote), never against text written for a person.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_check.py
"""
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from model import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import gpu_check  # noqa: E402

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses on the shared machine
STAGES = ["bench", "fashion", "cifar10", "torchrun", "resume"]


def gpu_check_process(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, env=ONE_THREAD, timeout=timeout)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_report(out, kept=()):
    """The run's JSON; it, the log and `kept` must be the only files in its folder."""
    assert sorted(os.listdir(out)) == sorted(["gpu_check.json", "gpu_check.log", *kept])
    return read_json(out / "gpu_check.json")


def assert_failed_with_one_line(proc, report):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"gpu_check.py: error: {report['failure']}\n", proc.stderr
    assert report["status"] == "failed" and "\n" not in report["failure"]


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_records_what_is_on_disk(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    began = time.monotonic()
    proc = gpu_check_process(out, "--dry-run", "--work-dir", work)
    seconds = time.monotonic() - began
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    report = read_report(out, kept=["cifar10"])
    assert report["status"] == "ok" and report["failure"] is None
    assert report["mode"].startswith("dry run") and report["budget_s"] == 480
    assert report["environment"]["torch"] == torch.__version__ and 0 < report["seconds"] <= seconds
    assert list(report["stages"]) == STAGES
    for name in STAGES:
        stage = report["stages"][name]
        assert stage["status"] == "ok" and stage["seconds"] > 0 and stage["figures"], (name, stage)
    figures = {name: report["stages"][name]["figures"] for name in STAGES}

    # bench: the figures are bench.py's own report, as it wrote it.
    assert figures["bench"] == read_json(work / "bench" / "bench.json")
    assert figures["bench"]["train"][0]["preset"] == "mnist"

    # fashion (digits in the dry run): each command's JSON, the checkpoint and the npz.
    fashion = figures["fashion"]
    for name in ("classifier", "sample", "metrics"):
        assert fashion[name] == read_json(work / "fashion" / f"{name}.json"), name
    train = read_json(work / "fashion" / "train.json")
    assert fashion["train"] == {**train, "seconds": fashion["train"]["seconds"]}
    assert fashion["train"]["seconds"] >= train["train_seconds"] > 0
    ckpt = load_checkpoint(train["checkpoint"])
    assert train["checkpoint"] == str(work / "fashion" / "run" / "ckpt.pt")
    assert ckpt["step"] == train["steps"] == 6 and ckpt["args"]["dataset"] == "digits"
    samples = np.load(work / "fashion" / "samples.npz")
    assert samples["images"].shape == (60, 8, 8, 1)  # w 0, 1, 3 × 10 classes × 2
    assert samples["w"].tolist() == [0.0] * 20 + [1.0] * 20 + [3.0] * 20
    assert fashion["sample"]["images"] == 60 and fashion["sample"]["sampler"] == "dpmpp2m-sde"
    assert fashion["classifier"]["path"] == str(work / "fashion" / "classifier.pt")
    assert os.path.isfile(fashion["classifier"]["path"])
    table = fashion["metrics"]
    assert [r["w"] for r in table["rows"]] == [0.0, 1.0, 3.0] and table["real"]["n"] == 20
    assert all(r["n"] == 20 and 0 <= r["accuracy"] <= 1 for r in table["rows"])

    # cifar10: the DDPM network on the image folder the dry run wrote, its classifier, samples
    # and table; the npz and the checkpoint's metadata kept in OUT_DIR for notebook 03.
    cifar = figures["cifar10"]
    data_dir = work / "cifar10" / "data"
    assert cifar["data_dir"] == str(data_dir)
    for split in ("train", "test"):
        assert sorted(os.listdir(data_dir / split)) == sorted(data.DATASETS["cifar10"].classes)
    ckpt = load_checkpoint(str(work / "cifar10" / "run" / "ckpt.pt"))
    assert ckpt["step"] == cifar["train"]["steps"] == 1 and ckpt["config"]["channels"] == 128
    assert ckpt["args"]["dataset"] == "cifar10" and ckpt["args"]["data_dir"] == str(data_dir)
    assert cifar["classifier"]["path"] == str(work / "cifar10" / "classifier.pt")
    assert os.path.isfile(cifar["classifier"]["path"])
    assert cifar["sample"] == read_json(work / "cifar10" / "sample.json")
    assert cifar["sample"]["sampler"] == "dpmpp2m-sde" and cifar["sample"]["images"] == 50
    assert cifar["sample"]["w"] == [0, 0.3, 1, 2, 4]
    assert cifar["files"] == {"samples": "cifar10/samples.npz",
                              "checkpoint_meta": "cifar10/checkpoint.json"}
    kept = np.load(out / cifar["files"]["samples"])
    assert kept["images"].shape == (50, 32, 32, 3)  # 5 w × 10 classes × 1
    assert np.allclose(kept["w"], np.repeat([0, 0.3, 1, 2, 4], 10))
    assert kept["labels"].tolist() == list(range(10)) * 5
    assert (kept["images"] == np.load(work / "cifar10" / "samples.npz")["images"]).all()
    meta = read_json(out / cifar["files"]["checkpoint_meta"])
    assert meta["step"] == 1 and meta["args"]["dataset"] == "cifar10"
    assert meta["config"] == json.loads(json.dumps(ckpt["config"]))
    assert meta["losses"] == pytest.approx(ckpt["losses"].tolist())
    table = cifar["metrics"]
    assert table == read_json(work / "cifar10" / "metrics.json")
    assert [r["w"] for r in table["rows"]] == [0.0, 0.3, 1.0, 2.0, 4.0]
    for r in table["rows"] + [table["real"]]:
        assert r["n"] == 10 and 0 <= r["accuracy"] <= 1 and r["fid"] >= 0

    # torchrun: one checkpoint with its preview grid, one npz, one process each.
    assert sorted(os.listdir(work / "torchrun")) == [
        "run", "sample.json", "samples.npz", "samples.png", "train.json"]
    run_dir = work / "torchrun" / "run"
    assert [n for n in os.listdir(run_dir) if n.startswith("ckpt")] == ["ckpt.pt"]
    assert os.path.isfile(run_dir / "samples_0000004.png")
    assert load_checkpoint(str(run_dir / "ckpt.pt"))["step"] == 4
    assert np.load(work / "torchrun" / "samples.npz")["labels"].tolist() == list(range(10)) * 2
    torchrun = figures["torchrun"]
    assert torchrun["train"]["processes"] == torchrun["sample"]["processes"] == 1

    # resume: --resume went on from the step the interrupted run saved, to the end.
    resume = figures["resume"]
    assert 0 < resume["interrupted_at_step"] < 40
    assert resume["train"] == read_json(work / "resume" / "train.json")
    assert resume["train"]["steps"] == 40
    assert resume["train"]["steps_this_run"] == 40 - resume["interrupted_at_step"]
    final = load_checkpoint(str(work / "resume" / "run" / "ckpt.pt"))
    assert final["step"] == len(final["losses"]) == 40 and torch.isfinite(final["losses"]).all()


@pytest.mark.parametrize("stage, flag, name", [("fashion", "--fashion-dir", "fashion-mnist"),
                                               ("cifar10", "--cifar-dir", "cifar10")])
def test_missing_data_fails_before_any_stage(tmp_path, stage, flag, name):
    """Not a dry run: the data check comes first, so it fails the same with or without a GPU."""
    (tmp_path / "empty").mkdir()
    proc = gpu_check_process(tmp_path / "out", "--stages", stage, flag, tmp_path / "empty",
                             timeout=120)
    report = read_report(tmp_path / "out")
    assert_failed_with_one_line(proc, report)
    assert report["failure"].startswith(f"no {name} in {flag} {tmp_path / 'empty'}: ")
    assert report["stages"] == {stage: {"status": "not run"}}


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_and_keeps_what_passed(tmp_path):
    """A busy torchrun port makes the torchrun stage fail: bench stays ok, resume is not run."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = gpu_check_process(tmp_path / "out", "--dry-run", "--stages", "bench", "torchrun",
                                 "resume", "--master-port", busy.getsockname()[1],
                                 "--work-dir", tmp_path / "work")
    report = read_report(tmp_path / "out")
    assert_failed_with_one_line(proc, report)
    stages = report["stages"]
    assert stages["bench"]["status"] == "ok" and stages["resume"] == {"status": "not run"}
    assert stages["torchrun"]["status"] == "failed" and "figures" not in stages["torchrun"]
    assert report["failure"] == f"stage torchrun: {stages['torchrun']['reason']}"
    assert report["failure"].startswith("stage torchrun: torchrun train.py exited with 1: ")
    assert not os.path.exists(tmp_path / "work" / "resume")


# ---------------------------------------------------------------- the command runner alone

@pytest.fixture
def run(tmp_path):
    return gpu_check.Run(gpu_check.parse_args([str(tmp_path), "--dry-run"]), io.StringIO())


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_command_past_its_time_limit_is_ended_with_its_children(run, tmp_path):
    script, pid_file = tmp_path / "sleeper.py", tmp_path / "child.pid"
    script.write_text("import subprocess, sys, time\n"
                      "sleep = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
                      "child = subprocess.Popen(sleep)\n"
                      f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                      "time.sleep(120)\n")
    began = time.monotonic()
    limit = r"^sleeper\.py did not finish in 3 s \(its time limit\)$"
    with pytest.raises(gpu_check.Failure, match=limit):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=3)
    assert time.monotonic() - began < 30
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_failing_command_gives_its_own_error_line(run, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('working', flush=True)\n"
                      "print('fails.py: error: the disk is full', file=sys.stderr)\n"
                      "print(' 50%|#####     | 1/2', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(gpu_check.Failure) as failure:
        gpu_check.run_command(run, [sys.executable, str(script), "--flag"], cap=60)
    assert str(failure.value) == "fails.py exited with 2: fails.py: error: the disk is full"
    script.write_text("raise ValueError('a bad value')\n")
    error = r"^fails\.py exited with 1: ValueError: a bad value$"
    with pytest.raises(gpu_check.Failure, match=error):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=60)


@pytest.mark.slow
def test_the_budget_limits_every_command(run, tmp_path):
    run.deadline = time.monotonic() + 2
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(60)\n")
    budget = r"did not finish in \d s \(the --budget ran out\)$"
    with pytest.raises(gpu_check.Failure, match=budget):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=60)


def test_the_training_runs_are_sized_from_the_bench_stage(tmp_path, monkeypatch):
    """GPU settings: --max-steps ≈ the stage's seconds × (images/s ÷ batch) of bench's row of its
    preset, within the settings' bounds; their default without a bench stage."""
    commands = []

    def first_command(run, command, cap, **kwargs):  # train.py's: record it, stop there
        commands.append([str(part) for part in command])
        raise gpu_check.Failure("stop")

    def max_steps(settings, preset, seconds):
        with pytest.raises(gpu_check.Failure, match="^stop$"):
            gpu_check.real_run(run, settings, "digits", [], preset, seconds, ["0"], [])
        return int(commands[-1][commands[-1].index("--max-steps") + 1])

    monkeypatch.setattr(gpu_check, "run_command", first_command)
    run = gpu_check.Run(gpu_check.parse_args([str(tmp_path)]), io.StringIO())
    run.work, fashion, cifar10 = str(tmp_path), run.settings["fashion"], run.settings["cifar10"]
    assert max_steps(fashion, "mnist", 45) == fashion["steps"][2]  # no bench stage: the default
    run.figures["bench"] = {"train": [
        {"preset": "mnist", "images_per_s": 3200.0, "batch_size": 32},
        {"preset": "cifar10", "images_per_s": 2560.0, "batch_size": 128}]}
    assert max_steps(fashion, "mnist", 45) == 45 * 100
    assert max_steps(cifar10, "cifar10", 75) == 75 * 20
    run.figures["bench"]["train"][0]["images_per_s"] = 32.0  # 1 step/s
    assert max_steps(fashion, "mnist", 45) == fashion["steps"][0] > 45
    assert commands[-1][:2] == [sys.executable, "train.py"] and "--amp" in commands[-1]


def test_no_compile_leaves_out_compile_and_keeps_autocast(tmp_path):
    """--no-compile (a lease too short for torch.compile's first compiles) runs every stage with
    --amp alone; the shared SETTINGS table is not changed by it."""
    run = gpu_check.Run(gpu_check.parse_args([str(tmp_path), "--no-compile"]), io.StringIO())
    assert run.speed.split() == ["--amp"]
    assert gpu_check.SETTINGS["gpu"]["speed"].split() == ["--amp", "--compile"]
    run = gpu_check.Run(gpu_check.parse_args([str(tmp_path)]), io.StringIO())
    assert run.speed.split() == ["--amp", "--compile"]

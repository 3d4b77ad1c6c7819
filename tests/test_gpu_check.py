"""scripts/gpu_check.py on a CPU: its --dry-run end to end, and its failures (exit code 1, one line).

The GPU check runs only when a GPU is lent, rarely; these tests keep it from rotting in between. The
dry run's JSON is checked against what the commands left on disk (checkpoints, npz, bench.py's own
report) and against the log, not against the script's own parsing alone.

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
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=ONE_THREAD, timeout=timeout)


def read_outputs(out, kept=()):
    """(the JSON, the log) of a run; they and `kept` (the cifar10 stage's folder) must be the only files in its folder."""
    assert sorted(os.listdir(out)) == sorted(["gpu_check.json", "gpu_check.log", *kept])  # no temporary files either
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    return report, (out / "gpu_check.log").read_text()


def assert_failed_with_one_line(proc, report, log):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"gpu_check.py: error: {report['failure']}", proc.stderr
    assert report["status"] == "failed" and "\n" not in report["failure"]
    assert log.rstrip().splitlines()[-1].startswith(f"gpu_check: failed: {report['failure']}")


def test_dry_run_passes_every_stage_and_records_what_is_on_disk(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    began = time.monotonic()
    proc = gpu_check_process(out, "--dry-run", "--work-dir", work)
    seconds = time.monotonic() - began
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    report, log = read_outputs(out, kept=["cifar10"])
    assert report["status"] == "ok" and report["failure"] is None and report["mode"].startswith("dry run")
    assert report["environment"]["torch"] == torch.__version__ and 0 < report["seconds"] <= seconds
    assert list(report["stages"]) == STAGES
    for name in STAGES:
        stage = report["stages"][name]
        assert stage["status"] == "ok" and stage["seconds"] > 0 and stage["figures"], (name, stage)
        assert f"======== stage {name}" in log

    # bench: the figures are bench.py's own report, copied.
    bench = report["stages"]["bench"]["figures"]
    with open(work / "bench" / "bench.json") as f:
        on_disk = json.load(f)
    assert bench["report"] == on_disk and bench["matmul_flops_per_s"] == on_disk["matmul_flops_per_s"]
    row = bench["presets"]["mnist"]
    assert row["train_images_per_s"] == on_disk["train"][0]["images_per_s"] > 0
    assert row["mfu"] == on_disk["train"][0]["mfu"] and row["peak_memory_mb"] > 0
    assert row["guided_over_unguided"] == on_disk["sample"][0]["ratio"] > 0
    assert row["hours_50k_fast_guided"] == pytest.approx(row["hours_50k_T256_guided"] * 24 / 256)  # T = 24 vs 256

    # fashion (digits in the dry run): the checkpoint, the npz and the metrics table.
    fashion = report["stages"]["fashion"]["figures"]
    ckpt = load_checkpoint(str(work / "fashion" / "run" / "ckpt.pt"))
    assert ckpt["step"] == fashion["train"]["steps"] == 6 and ckpt["args"]["dataset"] == "digits"
    assert fashion["train"]["loss_last"] == pytest.approx(ckpt["losses"][-3:].double().mean().item())
    samples = np.load(work / "fashion" / "samples.npz")
    assert samples["images"].shape == (60, 8, 8, 1)  # w 0, 1, 3 × 10 classes × 2
    assert samples["w"].tolist() == [0.0] * 20 + [1.0] * 20 + [3.0] * 20
    assert os.path.isfile(work / "fashion" / "classifier.pt")
    table = fashion["metrics"]
    assert [r["w"] for r in table["rows"]] == [0.0, 1.0, 3.0] and table["real"]["n"] == 20
    for r in table["rows"]:  # each row, formatted as metrics.py prints it, is in the log
        assert r["n"] == 20 and 0 <= r["accuracy"] <= 1
        assert (f"{r['w']:6.2f} {r['n']:7d} " + " ".join(f"{r[k]:9.4f}" for k in ("fid", "is", "is_std", "accuracy"))
                in log)
    assert fashion["sample"]["images"] == 60

    # cifar10: the DDPM network on the CIFAR-10 image folder the dry run wrote, its classifier, samples and table.
    cifar = report["stages"]["cifar10"]["figures"]
    data_dir = work / "cifar10" / "data"
    assert cifar["data_dir"] == str(data_dir)
    for split in ("train", "test"):
        assert sorted(os.listdir(data_dir / split)) == sorted(data.DATASETS["cifar10"].classes)
    ckpt = load_checkpoint(str(work / "cifar10" / "run" / "ckpt.pt"))
    assert ckpt["step"] == cifar["train"]["steps"] == 1 and ckpt["config"]["channels"] == 128
    assert ckpt["args"]["dataset"] == "cifar10" and ckpt["args"]["data_dir"] == str(data_dir)
    assert cifar["classifier"]["path"] == str(work / "cifar10" / "classifier.pt") and os.path.isfile(cifar["classifier"]["path"])
    assert "--sampler dpmpp2m-sde --w 0 0.3 1 2 4" in log and "CIFAR-10 metrics by the project's classifier" in log
    assert cifar["files"] == {"samples": "cifar10/samples.npz", "checkpoint_meta": "cifar10/checkpoint.json"}
    kept = np.load(out / cifar["files"]["samples"])
    assert kept["images"].shape == (50, 32, 32, 3) and cifar["sample"]["images"] == 50  # 5 w × 10 classes × 1
    assert np.allclose(kept["w"], np.repeat([0, 0.3, 1, 2, 4], 10)) and kept["labels"].tolist() == list(range(10)) * 5
    assert (kept["images"] == np.load(work / "cifar10" / "samples.npz")["images"]).all()
    with open(out / cifar["files"]["checkpoint_meta"]) as f:
        meta = json.load(f)
    assert meta["step"] == 1 and meta["config"] == json.loads(json.dumps(ckpt["config"])) and meta["args"]["dataset"] == "cifar10"
    assert meta["losses"] == pytest.approx(ckpt["losses"].tolist())
    table = cifar["metrics"]
    assert [r["w"] for r in table["rows"]] == [0.0, 0.3, 1.0, 2.0, 4.0] and table["real"]["n"] == 10
    for r in table["rows"] + [table["real"]]:
        assert r["n"] == 10 and 0 <= r["accuracy"] <= 1 and r["fid"] >= 0

    # torchrun: one checkpoint, one npz, one process.
    assert sorted(os.listdir(work / "torchrun")) == ["run", "samples.npz", "samples.png"]
    assert [n for n in os.listdir(work / "torchrun" / "run") if n.startswith("ckpt")] == ["ckpt.pt"]
    assert load_checkpoint(str(work / "torchrun" / "run" / "ckpt.pt"))["step"] == 4
    assert np.load(work / "torchrun" / "samples.npz")["labels"].tolist() == list(range(10)) * 2
    assert "torch.distributed.run" in log and "on 1 process(es)" in log

    # resume: train.py said it stopped (exit code 130) at the step the JSON names; --resume finished the run.
    resume = report["stages"]["resume"]["figures"]
    assert 0 < resume["interrupted_at_step"] < resume["final_step"] == 40
    assert f"train.py: stopped at step {resume['interrupted_at_step']}; saved" in log and "(exit code 130," in log
    final = load_checkpoint(str(work / "resume" / "run" / "ckpt.pt"))
    assert final["step"] == 40 and len(final["losses"]) == 40 and torch.isfinite(final["losses"]).all()
    assert log.rstrip().splitlines()[-1].startswith("gpu_check: ok")


@pytest.mark.parametrize("stage, flag, says", [("fashion", "--fashion-dir", "no Fashion-MNIST files"),
                                                ("cifar10", "--cifar-dir", "no CIFAR-10 in --cifar-dir")])
def test_missing_data_fails_before_any_stage(tmp_path, stage, flag, says):
    """Not a dry run: the data check comes first, so this fails the same way with or without a GPU."""
    (tmp_path / "empty").mkdir()
    proc = gpu_check_process(tmp_path / "out", "--stages", stage, flag, tmp_path / "empty", timeout=120)
    report, log = read_outputs(tmp_path / "out")
    assert_failed_with_one_line(proc, report, log)
    assert says in report["failure"] and str(tmp_path / "empty") in report["failure"]
    assert report["stages"] == {stage: {"status": "not run"}}


def test_a_failing_stage_stops_the_run_and_keeps_what_passed(tmp_path):
    """A busy torchrun port makes the torchrun stage fail: bench stays ok, resume is not run."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = gpu_check_process(tmp_path / "out", "--dry-run", "--stages", "bench", "torchrun", "resume",
                                 "--master-port", busy.getsockname()[1], "--work-dir", tmp_path / "work")
    report, log = read_outputs(tmp_path / "out")
    assert_failed_with_one_line(proc, report, log)
    stages = report["stages"]
    assert stages["bench"]["status"] == "ok" and stages["resume"] == {"status": "not run"}
    assert stages["torchrun"]["status"] == "failed"
    assert report["failure"] == f"stage torchrun: {stages['torchrun']['reason']}"
    assert report["failure"].startswith("stage torchrun: torchrun train.py exited with 1: ")
    assert "EADDRINUSE" in report["failure"] or "address already in use" in report["failure"]
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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_command_past_its_time_limit_is_ended_with_its_children(run, tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                      "print(child.pid, flush=True)\n"
                      "time.sleep(120)\n")
    began = time.monotonic()
    with pytest.raises(gpu_check.Failure, match=r"^sleeper\.py did not finish in 3 s \(its time limit\)$"):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=3)
    assert time.monotonic() - began < 30
    pid = int(run.log.getvalue().splitlines()[1])  # the line after the command: the child's pid
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
    assert "(stopped after" in run.log.getvalue()


def test_a_failing_command_gives_its_own_error_line(run, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('working', flush=True)\n"
                      "print('fails.py: error: the disk is full', file=sys.stderr)\n"
                      "print(' 50%|#####     | 1/2', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(gpu_check.Failure) as failure:
        gpu_check.run_command(run, [sys.executable, str(script), "--flag"], cap=60)
    assert str(failure.value) == "fails.py exited with 2: fails.py: error: the disk is full"
    script.write_text("raise ValueError('a bad value')\n")
    with pytest.raises(gpu_check.Failure, match=r"^fails\.py exited with 1: ValueError: a bad value$"):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=60)


def test_the_budget_limits_every_command(run, tmp_path):
    run.deadline = time.monotonic() + 2
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(gpu_check.Failure, match=r"did not finish in \d s \(the --budget ran out\)$"):
        gpu_check.run_command(run, [sys.executable, str(script)], cap=60)


def test_the_training_runs_are_sized_from_the_bench_stage(tmp_path):
    """GPU settings: --max-steps ≈ the stage's seconds × (images/s ÷ batch) of bench's row of its preset, within bounds."""
    run = gpu_check.Run(gpu_check.parse_args([str(tmp_path), "--train-seconds", "45"]), io.StringIO())
    settings = run.settings["fashion"]
    assert gpu_check.training_steps(run, settings, "mnist", 45) == settings["default_steps"]  # no bench stage
    run.figures["bench"] = {"presets": {"mnist": {"train_images_per_s": 3200.0, "batch_size": 32},
                                        "cifar10": {"train_images_per_s": 2560.0, "batch_size": 128}}}
    assert gpu_check.training_steps(run, settings, "mnist", 45) == 45 * 100
    assert gpu_check.training_steps(run, run.settings["cifar10"], "cifar10", 75) == 75 * 20
    run.figures["bench"]["presets"]["mnist"]["train_images_per_s"] = 32.0  # 1 step/s
    assert gpu_check.training_steps(run, settings, "mnist", 45) == settings["min_steps"] > 45


def test_no_compile_leaves_out_compile_and_keeps_autocast(tmp_path):
    """--no-compile (a lease too short for torch.compile's first compiles) runs every stage with --amp alone;
    the shared SETTINGS table is not changed by it."""
    run = gpu_check.Run(gpu_check.parse_args([str(tmp_path), "--no-compile"]), io.StringIO())
    assert run.settings["speed"] == ["--amp"]
    assert gpu_check.SETTINGS["gpu"]["speed"] == ["--amp", "--compile"]
    assert gpu_check.Run(gpu_check.parse_args([str(tmp_path)]), io.StringIO()).settings["speed"] == ["--amp", "--compile"]

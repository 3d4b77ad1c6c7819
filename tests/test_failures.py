"""train.py when things go wrong: kill -9 at several points (one halfway through a checkpoint
write), Ctrl-C, a loss that turns non-finite, a second run on the same --out-dir, every bad
command-line input and bad image folders.

The references are independent of the code under test: an uninterrupted run for the crash
test, the checkpoint's bytes before the failure for the NaN test. Test-only hooks live here,
not in train.py: train.main under `python -c` with torch.save replaced by one that writes half
the file and hangs; a non-finite loss forced with --lr 1e30 (Adam's first step moves every
weight by about the rate, so the next loss overflows).

Runs train.py in subprocesses on the digits preset with OMP_NUM_THREADS=1.
"""
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import train
from model import UNetConfig, load_checkpoint, save_checkpoint
from presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
RUN = ["--dataset", "digits", "--batch-size", "16", "--log-every", "5", "--ckpt-every", "5",
       "--sample-every", "0", "--warmup-steps", "5", "--seed", "1"]
STEPS = 30

# train.main with a checkpoint write that stops halfway at step HANG_STEP: the test kills it there.
SLOW_SAVE = """
import io, os, sys, time, torch
import train
real_save = torch.save
def save_half_then_hang(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == int(os.environ["HANG_STEP"]):
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        f.flush()
        open(os.environ["HANG_MARKER"], "w").close()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_half_then_hang
train.main(sys.argv[1:])
"""

# train.main with every step slowed by STEP_SLEEP seconds (same result): a signal sent after
# checkpoint k lands well before the run's end however fast the machine trains.
SLOW_STEPS = """
import os, sys, time
import train
real_update_ema = train.update_ema
def slow_update_ema(*args):
    time.sleep(float(os.environ["STEP_SLEEP"]))
    return real_update_ema(*args)
train.update_ema = slow_update_ema
train.main(sys.argv[1:])
"""

# train.main once the file GO exists: a run started (and past its imports) before its turn comes.
WAIT_TO_GO = """
import os, sys, time
import train
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.02)
train.main(sys.argv[1:])
"""


def start(args, script=None, env=None):
    command = [sys.executable, TRAIN] if script is None else [sys.executable, "-c", script]
    return subprocess.Popen(command + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, **(env or {})}, cwd=REPO)


def run(args):
    """python train.py ARGS to its end: the CompletedProcess."""
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO)


def wait_for(condition, process, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"ended early: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def ckpt_step(path):
    """The step of the checkpoint at `path`, or -1 if there is none yet. It must always load."""
    return load_checkpoint(path)["step"] if os.path.exists(path) else -1


def same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-7,
                                       msg=f"{key}.{name}")
    torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    reference = run(RUN + ["--max-steps", str(STEPS), "--out-dir", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    ckpt = str(out / "ckpt.pt")
    args = RUN + ["--max-steps", str(STEPS), "--out-dir", str(out)]

    # 1. kill -9 halfway through writing the step-10 checkpoint: ckpt.pt is still step 5's.
    marker = str(tmp_path / "hanging")
    proc = start(args, script=SLOW_SAVE, env={"HANG_STEP": "10", "HANG_MARKER": marker})
    wait_for(lambda: os.path.exists(marker), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_step(ckpt) == 5
    half_written = [f for f in os.listdir(out) if f.startswith("ckpt.pt.tmp")]
    assert len(half_written) == 1

    # 2. resume, then kill -9 at whatever moment follows the step-15 checkpoint.
    slow = dict(script=SLOW_STEPS, env={"STEP_SLEEP": "0.1"})
    proc = start(args + ["--resume"], **slow)
    wait_for(lambda: ckpt_step(ckpt) >= 15, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert half_written[0] not in os.listdir(out)  # the resumed run removed the torn file
    assert "5 steps done" in proc.stdout.read()

    # 3. resume, then Ctrl-C: the run finishes its step, saves that step and exits with 130.
    proc = start(args + ["--resume"], **slow)
    wait_for(lambda: ckpt_step(ckpt) >= 20, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert 20 <= ckpt_step(ckpt) < STEPS and os.path.exists(out / "loss.png")

    # 4. resume to the end: the weights, EMA and losses of the run that was never stopped.
    final = run(args + ["--resume"])
    assert final.returncode == 0, final.stderr
    same_state(load_checkpoint(ckpt), load_checkpoint(str(tmp_path / "reference" / "ckpt.pt")))


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_is_refused_until_the_first_one_dies(tmp_path):
    out = tmp_path / "out"
    lock = out / train.LOCK_FILE
    go_second, go_third = tmp_path / "go_second", tmp_path / "go_third"
    forever = ["--max-steps", "1000000", "--ckpt-every", "1000000"]
    first = start(RUN + forever + ["--out-dir", str(out)])
    second = start(RUN + ["--max-steps", "1", "--out-dir", str(out)], script=WAIT_TO_GO,
                   env={"GO": str(go_second)})
    third = start(RUN + ["--max-steps", "1", "--log-every", "1", "--out-dir", str(out)],
                  script=WAIT_TO_GO, env={"GO": str(go_third)})
    try:
        wait_for(lambda: lock.exists() and lock.read_text().startswith(f"{first.pid} "), first,
                 timeout=120)
        go_second.touch()
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2, stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
        assert stderr.startswith(f"train.py: error: --out-dir {out} is in use by another "
                                 f"train.py (process {first.pid} on ")
        # The first run goes on, untouched.
        assert first.poll() is None and not os.path.exists(out / "ckpt.pt")
        first.send_signal(signal.SIGKILL)
        first.wait()
        go_third.touch()  # the OS released the dead run's lock: the third run takes it
        _, stderr = third.communicate(timeout=120)
        assert third.returncode == 0, stderr
        assert ckpt_step(str(out / "ckpt.pt")) == 1
        assert not lock.exists()  # a run that finished removed its lock file
    finally:
        for proc in (first, second, third):
            proc.kill()
            proc.wait()


def test_lock_out_dir_holds_while_the_file_is_open(tmp_path):
    out = str(tmp_path / "out")
    held, error = cli.lock_out_dir(out, train.LOCK_FILE, "train.py")
    assert error is None
    assert (tmp_path / "out" / train.LOCK_FILE).read_text().startswith(f"{os.getpid()} on ")
    # A second open file of the same process: flock refuses it too.
    again, error = cli.lock_out_dir(out, train.LOCK_FILE, "train.py")
    assert again is None and f"(process {os.getpid()} on " in error and "\n" not in error
    held.close()
    again, error = cli.lock_out_dir(out, train.LOCK_FILE, "train.py")
    assert error is None
    cli.release_out_dir(again)  # a finished run: the file is gone
    assert os.listdir(out) == []


def test_a_lock_on_a_file_removed_meanwhile_is_taken_on_the_new_file(tmp_path, monkeypatch):
    """The holder finished (removed the file) between this run's open and its flock: the lock
    must be taken on the file at the path, or two runs could hold two different files."""
    real, calls = cli.fcntl.flock, []

    def flock(f, operation):
        if not calls:
            os.remove(f.name)  # the finishing holder
        calls.append(f.name)
        real(f, operation)
    monkeypatch.setattr(cli.fcntl, "flock", flock)
    lock, error = cli.lock_out_dir(str(tmp_path), train.LOCK_FILE, "train.py")
    assert error is None and len(calls) == 2
    assert os.path.samestat(os.fstat(lock.fileno()), os.stat(tmp_path / train.LOCK_FILE))
    lock.close()


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    args = RUN + ["--out-dir", str(tmp_path)]
    ckpt = str(tmp_path / "ckpt.pt")
    first = run(args + ["--max-steps", "5"])
    assert first.returncode == 0, first.stderr
    with open(ckpt, "rb") as f:
        good = hashlib.sha256(f.read()).hexdigest()
    # Step 6 moves every weight by ~1e30; step 7's loss overflows; step 10 would checkpoint.
    bad = run(args + ["--max-steps", "20", "--lr", "1e30", "--resume"])
    assert bad.returncode == 1
    message = bad.stderr.strip().splitlines()[-1]
    assert "loss became" in message and "steps 6-10" in message and "untouched" in message
    assert "Traceback" not in bad.stderr
    with open(ckpt, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == good  # not overwritten
    stored = load_checkpoint(ckpt)
    assert stored["step"] == 5 and all(torch.isfinite(v).all() for v in stored["model"].values())


# ------------------------------------------------------------------ bad input: one line, exit 2

class PickledCode:
    """Not a tensor or a plain value: torch.load(weights_only=True) must refuse to rebuild it."""


def write_checkpoint(path, dataset="digits", config=None, pickled_code=False, truncate=False):
    config = dataclasses.asdict(config or PRESETS["digits"].network)
    ckpt = {"config": config, "ema": {}, "args": {"dataset": dataset}}
    if pickled_code:
        ckpt["hook"] = PickledCode()
        torch.save(ckpt, path)
    else:
        save_checkpoint(ckpt, path)
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


# (flags, a phrase the one-line message must contain, the checkpoint to put in {tmp}/out first).
OTHER_CONFIG = UNetConfig(**{**dataclasses.asdict(PRESETS["digits"].network), "channels": 16})
RESUME = ["--resume", "--out-dir", "{tmp}/out"]
BAD_INPUTS = [
    (["--dataset", "imagenet"], "invalid choice", None),
    (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], "place", None),  # offline and no files
    (["--out-dir", "{tmp}/a_file/sub"], "cannot write to --out-dir", None),
    (["--p-uncond", "1.5"], "outside [0, 1]", None),
    (["--p-uncond", "-0.1"], "outside [0, 1]", None),
    (RESUME, "no checkpoint", None),
    (RESUME, "trained on 'mnist'", dict(dataset="mnist")),
    (RESUME, "model config", dict(config=OTHER_CONFIG)),
    (RESUME, "pickled", dict(pickled_code=True)),
    (RESUME, "truncated", dict(truncate=True)),
    (RESUME, "not a complete train.py checkpoint", dict()),  # no weights
    (["--out-dir", "{tmp}/out"], "add --resume", dict()),
    (["--max-steps", "0"], "--max-steps: must be positive", None),
    (["--max-steps", "ten"], "invalid int", None),
    (["--batch-size", "0"], "--batch-size: must be positive", None),
    (["--batch-size", "-8"], "--batch-size: must be positive", None),
    (["--batch-size", "5000"], "larger than the 1797 images", None),
    (["--log-every", "0"], "--log-every: must be positive", None),
    (["--ckpt-every", "-1"], "--ckpt-every: must be positive", None),
    (["--sample-steps", "0"], "--sample-steps: must be positive", None),
    (["--sample-every", "-1"], "--sample-every: must be 0 or more", None),
    (["--warmup-steps", "-1"], "--warmup-steps: must be 0 or more", None),
    (["--seed", "-1"], "--seed: must be 0 or more", None),
    (["--lr", "0"], "--lr: must be positive", None),
    (["--lr", "nan"], "--lr: must be positive", None),
    (["--grad-clip", "0"], "--grad-clip: must be positive", None),
    (["--ema-decay", "1"], "outside [0, 1)", None),
    (["--holdout", "-1"], "--holdout: must be 0 or more", None),
    (["--holdout", "200"], "cannot hold out 200", None),  # digits: 174-183 images per class
    (["--image-size", "16"], "applies to --dataset imagefolder only", None),
    (["--preset", "mnist"],
     "--preset mnist is not a network for the images of digits: choose one of digits", None),
    (["--dataset", "mnist", "--preset", "cifar10"], "choose one of mnist,", None),
    (["--dataset", "imagefolder", "--data-dir", "{tmp}/empty"], "no folder", None),
    (["--dataset", "imagefolder", "--image-size", "4"], "--image-size: must be 8 or more", None),
    (["--dataset", "imagefolder", "--preset", "imagenet"], "invalid choice", None),
    (["--logsnr-schedule", "linear"], "invalid choice", None),
    (["--device", "tpu0"], "is not a device", None),
    pytest.param(["--device", "cuda"], "no CUDA device", None,
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
]


@pytest.mark.parametrize("flags, phrase, stored", BAD_INPUTS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_each_bad_input_is_one_line_and_exit_2(flags, phrase, stored, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9")  # no network: downloads fail at once
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0.0)
    monkeypatch.chdir(tmp_path)  # the default --out-dir out/<dataset> lands here
    (tmp_path / "a_file").write_text("")
    if stored is not None:
        os.makedirs(tmp_path / "out")
        write_checkpoint(str(tmp_path / "out" / "ckpt.pt"), **stored)
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag.format(tmp=tmp_path) for flag in flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: ") and phrase in err, err


def write_folder(root, case):
    """An image folder of two classes with one thing wrong: what the message must name."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / name / "0.png")
    if case == "corrupt image":
        (root / "train" / "b" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
        return str(root / "train" / "b" / "1.jpg")
    if case == "empty class folder":
        (root / "train" / "c").mkdir()
        return str(root / "train" / "c")
    if case == "one class":
        os.remove(root / "train" / "b" / "0.png")
        os.rmdir(root / "train" / "b")
        return "one class folder (a)"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["corrupt image", "empty class folder", "one class"])
def test_bad_image_folder_is_one_line_exit_2_and_caches_nothing(case, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    named = write_folder(tmp_path / "images", case)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
                    "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: ") and named in err, err
    assert not (tmp_path / "cache").exists()
    assert sorted(os.listdir(tmp_path / "out")) == [train.LOCK_FILE]


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = start(["--resume", "--out-dir", str(tmp_path)])  # the table above, as a real process
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr

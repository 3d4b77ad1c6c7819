"""One prepared command that runs every CUDA code path of the project in minutes and brings the figures back.

GPU time is often short (minutes, on a machine that may reach no network), so one run must prove every
CUDA path with no debugging on the clock. Five stages, in order,
each running the project's own commands as subprocesses, each command with a time limit:

  bench     bench.py --device cuda --amp --compile --presets mnist cifar10: training images/s, MFU
            against the measured bf16 matmul rate, peak memory, guided/unguided cost ratio, and the
            hours for 50,000 guided samples at T = 256 and with the fast sampler
  fashion   a real run: train.py --dataset fashion-mnist --amp --compile (about --train-seconds of
            steps, sized from the bench stage's images/s), metrics.py train-classifier, sample.py
            --sampler dpmpp2m-sde --w 0 1 3 --n-per-class 100, and metrics.py mnist's table
  cifar10   a real run on CIFAR-10 (--cifar-dir): the DDPM network, train.py --dataset cifar10 --amp --compile
            (about --cifar-train-seconds of steps, sized from the bench stage's cifar10 images/s), the metrics
            classifier (--cifar-classifier, else metrics.py train-classifier --epochs 6), sample.py --sampler
            dpmpp2m-sde --w 0 0.3 1 2 4 --n-per-class 200 (2,000 per w), metrics.py cifar10's table and floor;
            the npz and the checkpoint's metadata are kept as OUT_DIR/cifar10/samples.npz and checkpoint.json
            (notebook 03 reads both; metrics.load_samples_npz for the npz)
  torchrun  torchrun --nproc_per_node=1 train.py --amp --compile (DDP), then sample.py (NCCL): one
            checkpoint, one npz
  resume    train.py, Ctrl-C (SIGINT) once a checkpoint exists (it saves and exits 130), then --resume
            to --max-steps

    python scripts/gpu_check.py OUT_DIR                     # on the GPU: at most --budget 480 s
    python scripts/gpu_check.py OUT_DIR --stages cifar10 resume   # rerun some stages only
    python scripts/gpu_check.py OUT_DIR --cifar-dir ~/cifar10 --cifar-classifier clf.pt   # reuse a classifier
    python scripts/gpu_check.py OUT_DIR --no-compile              # bf16 autocast alone: torch.compile's first
                                                                  # compile of each shape can take minutes
    OMP_NUM_THREADS=1 python scripts/gpu_check.py OUT_DIR --dry-run   # CPU, tiny sizes (tests/test_gpu_check.py)

It writes into OUT_DIR gpu_check.json (the device, torch version, and per stage its status, seconds
and figures; rewritten after every stage), gpu_check.log (every command and its whole output) and
the cifar10 stage's cifar10/ folder (its paths, relative to OUT_DIR, are in the JSON). Checkpoints,
samples and data go to --work-dir (default: a temporary folder, removed at the end). The first failure stops the run: exit code 1 and a one-line reason on stderr, also in
the JSON ("failure"); later stages are "not run".

--dry-run runs the same stages on the CPU with tiny sizes: digits instead of Fashion-MNIST and a
small synthetic CIFAR-10 image folder it writes itself (no data files needed), one cifar10 step,
10 samples per w, no --amp/--compile (bf16 autocast and compile are the CUDA paths), gloo instead
of NCCL, a handful of steps. Its figures mean nothing; it exists so that the script cannot rot
between GPU runs.

A GPU run needs Fashion-MNIST's four official IDX files and CIFAR-10 (the official archive, or its
images as train/<class>/*.jpg and test/<class>/*.jpg): pass their folders with --fashion-dir and
--cifar-dir, or place them where the defaults look (data/fashion-mnist and data/cifar10; see --help).
Without them the run stops at once (before any stage) and says so.

The time budget (--budget 480, 8 minutes; the shares are estimates for an H100-class GPU): bench about 1.5 minutes, fashion 2
(45 s of training), cifar10 about 3.5 (75 s of training, the classifier's 6 epochs, 10,000 samples),
torchrun and resume 1. On a slower GPU give --cifar-train-seconds less, or a --budget to match.
"""
import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data  # noqa: E402
from model import CheckpointError, load_checkpoint  # noqa: E402

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_DIRS = ("data/fashion-mnist", "data")  # relative to the repo root: where data.py downloads it (--data-dir data)
CIFAR_DIR, CIFAR_ARCHIVE = "data/cifar10", "cifar-10-python.tar.gz"  # the default --cifar-dir, relative to the repo root

# What the stages run: on the GPU (the real check) and with --dry-run (tiny sizes on a CPU).
SETTINGS = {
    "gpu": dict(
        device="cuda",
        speed=["--amp", "--compile"],  # bf16 autocast and torch.compile: the CUDA paths under test
        bench=dict(presets=["mnist", "cifar10"], flags=[]),  # bench.py's own defaults otherwise
        fashion=dict(dataset="fashion-mnist", holdout=[],  # fashion-mnist: no holdout, the t10k split is the reference
                     min_steps=500, max_steps=20_000, default_steps=3000,  # default: when the bench stage did not run
                     preview_steps=64, train=[], classifier=["--epochs", "5"],
                     sample=["--n-per-class", "100"]),  # dpmpp2m-sde at its default T = 24
        cifar10=dict(min_steps=200, max_steps=50_000, default_steps=1500, preview_steps=32, train=[],
                     classifier=["--epochs", "6"],  # of metrics.CIFAR_EPOCHS (12): a minute, not two
                     sample=["--n-per-class", "200", "--batch-size", "1000"]),  # 2,000 per w, dpmpp2m-sde's T = 24
        torchrun=dict(steps=200, train=["--sample-steps", "16"], sample=["--n-per-class", "4", "--steps", "32"]),
        resume=dict(steps=1000, ckpt_every=100, train=["--amp"]),
    ),
    "dry": dict(
        device="cpu",
        speed=[],
        bench=dict(presets=["mnist"], flags=["--batch-size", "4", "--iters", "1", "--warmup", "1", "--min-seconds", "0",
                                             "--sample-iters", "1", "--sample-batch-size", "4", "--matmul-sizes", "256"]),
        fashion=dict(dataset="digits", holdout=["--holdout", "10"],  # digits has no test split
                     min_steps=6, max_steps=6, default_steps=6,
                     preview_steps=2, train=["--batch-size", "16"], classifier=["--epochs", "1"],
                     sample=["--n-per-class", "2", "--steps", "3"]),
        cifar10=dict(min_steps=1, max_steps=1, default_steps=1, preview_steps=None,  # no preview: slow on a CPU
                     train=["--batch-size", "2"], classifier=["--epochs", "1", "--batch-size", "10"],
                     sample=["--n-per-class", "1", "--steps", "1"],  # 10 per w: the fewest metrics.py's IS takes
                     folder_images_per_class=2),  # of the image folder it writes
        torchrun=dict(steps=4, train=["--batch-size", "8", "--sample-steps", "2"],
                      sample=["--n-per-class", "1", "--steps", "2"]),
        resume=dict(steps=40, ckpt_every=4, train=["--batch-size", "8"]),
    ),
}


class Failure(Exception):
    """A check that failed; its message is the one-line reason."""


# ------------------------------------------------------------------ running the project's commands

class Run:
    """What the stages share: the settings, the folders, the log, the time left, earlier stages' figures."""

    def __init__(self, args, log):
        self.args, self.log = args, log
        self.settings = dict(SETTINGS["dry" if args.dry_run else "gpu"])
        if args.no_compile:  # torch.compile's first compile of each shape can take minutes
            self.settings["speed"] = [flag for flag in self.settings["speed"] if flag != "--compile"]
        self.device = self.settings["device"]
        self.deadline = time.monotonic() + args.budget
        self.figures = {}  # stage name -> its figures, once it passed
        self.work = None  # the stage's own folder under --work-dir, set before each stage

    def write_log(self, text):
        self.log.write(text if text.endswith("\n") else text + "\n")
        self.log.flush()


def tidy(output):
    """A command's output (bytes) as text, each line rewritten with carriage returns (progress bars) at its last state."""
    text = output.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return "\n".join(line.rstrip("\r").split("\r")[-1] for line in text.split("\n")).strip()


def last_line(text, pattern=None):
    """The last line of `text` that says something (matches `pattern`, if given), at most 400 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip(" =-_")]
    lines = [line for line in lines if pattern is None or re.search(pattern, line)]
    return lines[-1][:400] if lines else None


def why_it_failed(text):
    """The line that says why a command failed: the project's own one-line error, else the exception a
    traceback ends with (not torchrun's ChildFailedError, which only says that a worker failed), else the last."""
    return (last_line(text, r"^\w+\.py: error: |^metrics\.py: ") or last_line(text, r"^[\w.]*(Error|Exception|Interrupt)\b(?<!ChildFailedError)")
            or last_line(text) or "(no output)")


def label(command):
    """A short name for messages: 'train.py', 'metrics.py mnist', 'torchrun sample.py'."""
    script = next((i for i, part in enumerate(command) if part.endswith(".py")), 0)
    name = os.path.basename(command[script])
    if script + 1 < len(command) and not command[script + 1].startswith("-"):
        name += " " + command[script + 1]  # a subcommand
    return ("torchrun " if "torch.distributed.run" in command else "") + name


def start(run, command):
    """Start one command in the repo root, in its own process group (so a time-out can end its children)."""
    command = [str(part) for part in command]
    if time.monotonic() >= run.deadline:
        raise Failure(f"the --budget ran out before {label(command)}")
    run.write_log("$ " + " ".join(command))
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # bytes: text mode would turn progress bars' \r into lines
    proc.began = time.monotonic()
    return proc


def stop(proc):
    """End a command and return its (stdout, stderr): SIGTERM first (train.py saves and exits; torchrun passes
    it on to its workers, which run in sessions of their own), SIGKILL to its process group 40 s later."""
    proc.terminate()
    give_up = time.monotonic() + 40
    while True:
        try:
            return proc.communicate(timeout=1)  # it ended, and so did everything that held its output
        except subprocess.TimeoutExpired:  # still running, or it ended and a child still holds its output
            if proc.poll() is not None or time.monotonic() > give_up:
                break
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its whole process group (train.py's preview sample.py, say)
    except ProcessLookupError:
        pass
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return b"", b"(the rest of its output is lost: a process in a session of its own still holds it)"


def finish(run, proc, cap, expect=0):
    """Wait for a started command (at most `cap` seconds and the time left), log its output, and return
    (stdout, stderr, seconds since its start) as text; a time-out or an exit code other than `expect` raises Failure."""
    name, began = label(proc.args), proc.began
    timeout = min(cap, run.deadline - time.monotonic())
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.01))
    except BaseException as e:  # the time-out, or Ctrl-C of this script: end the command, keep its output
        out, err = stop(proc)
        run.write_log("\n".join(filter(None, [tidy(out), tidy(err), f"(stopped after {time.monotonic() - began:.1f} s)\n"])))
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        why = "the --budget ran out" if timeout < cap else "its time limit"
        raise Failure(f"{name} did not finish in {timeout:.0f} s ({why})") from None
    seconds, out, err = time.monotonic() - began, tidy(out), tidy(err)
    run.write_log("\n".join(filter(None, [out, err, f"(exit code {proc.returncode}, {seconds:.1f} s)\n"])))
    if proc.returncode != expect:
        raise Failure(f"{name} exited with {proc.returncode}" + (f" (expected {expect})" if expect else "")
                      + f": {why_it_failed(err if err.strip() else out)}")
    return out, err, seconds


def run_command(run, command, cap):
    """Run one of the project's commands to the end: (stdout, stderr, seconds), or Failure."""
    return finish(run, start(run, command), cap)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run):
    return TORCHRUN + [f"--master_port={run.args.master_port or free_port()}"]


# ------------------------------------------------------------------ reading what the commands wrote

def checkpoint(path, steps):
    """The train.py checkpoint at `path`, checked to hold `steps` steps of finite losses."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise Failure(str(e)) from None
    if ckpt["step"] != steps or len(ckpt["losses"]) != steps or not torch.isfinite(ckpt["losses"]).all():
        raise Failure(f"{path}: step {ckpt['step']} with {len(ckpt['losses'])} losses, expected {steps} finite ones")
    return ckpt


def loss_figures(ckpt):
    losses = ckpt["losses"].double()
    n = max(1, min(100, len(losses) // 2))
    return dict(steps=int(ckpt["step"]), loss_first=losses[:n].mean().item(), loss_last=losses[-n:].mean().item())


def train_images_per_s(stderr):
    """train.py's own reading at its last log step (img_s in the progress bar: training alone), or None."""
    readings = re.findall(r"img_s=(\d+)", stderr)
    return int(readings[-1]) if readings else None


def samples(path, ws, classes, n_per_class, image_shape):
    """Check a sample.py --npz file against the grid it was asked for (w, class, index); return the images."""
    try:
        with np.load(path) as f:
            images, labels, w = f["images"], f["labels"], f["w"]
    except (OSError, KeyError, ValueError) as e:
        raise Failure(f"{path} is not a sample.py npz ({type(e).__name__}: {e})") from None
    expected_labels = [c for _ in ws for c in classes for _ in range(n_per_class)]
    expected_w = [v for v in ws for _ in classes for _ in range(n_per_class)]
    if (images.shape != (len(expected_labels), *image_shape) or images.dtype != np.uint8
            or labels.tolist() != expected_labels or not np.allclose(w, expected_w)):  # w: float32 in the file
        raise Failure(f"{path}: images {images.shape} {images.dtype}, labels and w do not match the grid asked for")
    if images.min() == images.max():
        raise Failure(f"{path}: every pixel is {images.min()}")
    return images


def sampling_rate(stdout):
    """(images, seconds, processes) from sample.py's last line."""
    found = re.search(r"(\d+) images in ([\d.]+) s on (\d+) process", stdout)
    if not found:
        raise Failure(f"sample.py did not report its images: {why_it_failed(stdout)}")
    return int(found[1]), float(found[2]), int(found[3])


def metrics_table(stdout, ws):
    """metrics.py mnist's or cifar10's table: {"rows": [{w, n, fid, is, is_std, accuracy}], "real": {...}}."""
    keys = ("n", "fid", "is", "is_std", "accuracy")
    rows, real = [], None
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 6 and re.fullmatch(r"-?\d+(\.\d+)?", parts[0]):
            rows.append(dict(w=float(parts[0]), **{k: float(v) for k, v in zip(keys, parts[1:6])}))
        elif len(parts) >= 6 and parts[0] == "real":
            real = {k: float(v) for k, v in zip(keys, parts[1:6])}
    if sorted(row["w"] for row in rows) != sorted(ws) or real is None:
        raise Failure(f"metrics.py printed no table row for each w in {ws} and the real floor")
    for row in rows + [real]:
        row["n"] = int(row["n"])
        if not all(math.isfinite(v) for v in row.values()):
            raise Failure(f"metrics.py printed a non-finite figure: {row}")
    return dict(rows=rows, real=real)


def only_files(folder, prefix):
    """The names in `folder` that start with `prefix` (e.g. exactly one checkpoint, no temporary files)."""
    return sorted(name for name in os.listdir(folder) if name.startswith(prefix))


# ------------------------------------------------------------------ the stages

def stage_bench(run):
    """bench.py on the device: training and sampling speed per preset, copied from its JSON report."""
    s, path = run.settings["bench"], os.path.join(run.work, "bench.json")
    run_command(run, [PY, "bench.py", "--device", run.device, *run.settings["speed"], "--presets", *s["presets"],
                      *s["flags"], "--json", path], cap=360)
    with open(path) as f:
        report = json.load(f)
    presets = {row["preset"]: dict(batch_size=row["batch_size"], train_images_per_s=row["images_per_s"],
                                   mfu=row["mfu"], peak_memory_mb=row["peak_memory_mb"],
                                   peak_memory_kind=row["peak_memory_kind"]) for row in report["train"]}
    for row in report["sample"]:
        presets[row["preset"]].update(
            sample_batch_size=row["batch_size"], guided_over_unguided=row["ratio"],
            guided_over_unguided_two_passes=row["ratio_two_passes"],
            hours_50k_T256_guided=row["hours_50k_T256_guided"], hours_50k_fast_guided=row["hours_50k_fast_guided"],
            fast_sampler=f"{row['fast_sampler']}, T = {row['fast_steps']}")
    for preset in s["presets"]:
        row = presets.get(preset, {})
        numbers = [v for v in row.values() if isinstance(v, (int, float))]
        if "guided_over_unguided" not in row or not all(math.isfinite(v) and v > 0 for v in numbers):
            raise Failure(f"bench.py's report lacks positive finite figures for {preset}: {row}")
    return dict(matmul_flops_per_s=report["matmul_flops_per_s"], mfu_vs=report["mfu_vs"], presets=presets,
                report=report)


def fashion_dir(args):
    """The folder that holds the Fashion-MNIST files (itself or its fashion-mnist/ subfolder), or Failure."""
    candidates = [args.fashion_dir] if args.fashion_dir else [os.path.join(REPO, d) for d in FASHION_DIRS]
    for folder in candidates:
        for place in (os.path.join(folder, "fashion-mnist"), folder):
            if all(os.path.isfile(os.path.join(place, name)) for name in FASHION_FILES):
                return place
    if args.fashion_dir:
        raise Failure(f"no Fashion-MNIST files ({', '.join(FASHION_FILES)}) in --fashion-dir {args.fashion_dir}")
    raise Failure(f"no Fashion-MNIST files in {' or '.join(FASHION_DIRS)} (from the repo root): download them "
                  "(python data.py fashion-mnist --data-dir data) or pass --fashion-dir DIR")


def training_steps(run, settings, preset, seconds):
    """--max-steps for about `seconds` of training, from the bench stage's images/s of `preset` (the network
    and batch the stage trains), within the settings' bounds; the settings' default when bench did not run."""
    row = run.figures.get("bench", {}).get("presets", {}).get(preset)
    if not row:
        return settings["default_steps"]
    steps = seconds * row["train_images_per_s"] / row["batch_size"]
    return int(min(max(steps, settings["min_steps"]), settings["max_steps"]))


def train(run, s, dataset, data, steps):
    """train.py for `steps` steps (a preview grid at the end at T = the settings' preview_steps, if not None):
    (the checkpoint's path, the checkpoint, the figures)."""
    out_dir, preview_steps = os.path.join(run.work, "run"), s["preview_steps"]
    preview = ["--sample-every", steps, "--sample-steps", preview_steps] if preview_steps else ["--sample-every", 0]
    _, err, seconds = run_command(run, [PY, "train.py", "--dataset", dataset, *data, "--out-dir", out_dir,
                                        "--max-steps", steps, *preview, "--device", run.device,
                                        *run.settings["speed"], *s["train"]], cap=s["train_seconds"] + 240)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = checkpoint(ckpt_path, steps)
    if preview_steps and not os.path.isfile(os.path.join(out_dir, f"samples_{steps:07d}.png")):
        raise Failure(f"train.py drew no preview grid at step {steps}: {last_line(err, 'preview') or 'no warning'}")
    return ckpt_path, ckpt, dict(**loss_figures(ckpt), seconds=seconds, images_per_s=train_images_per_s(err))


def train_metrics_classifier(run, s, dataset, data):
    """metrics.py train-classifier into the stage's folder: (its path, its figures)."""
    clf = os.path.join(run.work, "classifier.pt")
    out, _, seconds = run_command(run, [PY, "metrics.py", "train-classifier", "--dataset", dataset, *data,
                                        "--device", run.device, "--out", clf, *s["classifier"]], cap=300)
    found = re.search(r"test accuracy ([\d.]+) on (.+) \(", out)
    if not found or not os.path.isfile(clf):
        raise Failure(f"metrics.py train-classifier saved no classifier: {why_it_failed(out)}")
    return clf, dict(test_accuracy=float(found[1]), test_split=found[2], seconds=seconds, path=clf)


def sample_and_measure(run, s, ckpt_path, ckpt, ws, metrics_command):
    """sample.py --sampler dpmpp2m-sde at each w into the stage's samples.npz, checked against the grid asked for,
    then `metrics_command` + the npz (metrics.py's per-w table): (npz path, figures of both)."""
    npz = os.path.join(run.work, "samples.npz")
    out, _, _ = run_command(run, [PY, "sample.py", "--ckpt", ckpt_path, "--sampler", "dpmpp2m-sde", "--w", *ws,
                                  *s["sample"], "--npz", npz, "--out", os.path.join(run.work, "samples.png"),
                                  "--device", run.device], cap=300)
    config, flags = ckpt["config"], s["sample"]
    n_per_class = int(flags[flags.index("--n-per-class") + 1])
    samples(npz, [float(w) for w in ws], list(range(config["num_classes"])), n_per_class,
            (config["image_size"], config["image_size"], config["in_channels"]))
    images, seconds, _ = sampling_rate(out)
    out, _, _ = run_command(run, [*metrics_command, "--npz", npz], cap=300)
    return npz, dict(sample=dict(sampler="dpmpp2m-sde", images=images, seconds=seconds, images_per_s=images / seconds),
                     metrics=metrics_table(out, [float(w) for w in ws]))


def stage_fashion(run):
    """A real run: train, the metrics classifier, guided samples with the fast sampler, their metrics."""
    s = dict(run.settings["fashion"], train_seconds=run.args.train_seconds)
    dataset, data = s["dataset"], (["--data-dir", fashion_dir(run.args)] if s["dataset"] != "digits" else [])
    data += s["holdout"]
    steps = training_steps(run, s, "mnist", run.args.train_seconds)  # the mnist network and batch
    ckpt_path, ckpt, train_figures = train(run, s, dataset, data, steps)
    clf, classifier_figures = train_metrics_classifier(run, s, dataset, data)
    _, figures = sample_and_measure(run, s, ckpt_path, ckpt, ["0", "1", "3"],
                                    [PY, "metrics.py", "mnist", "--dataset", dataset, *data, "--classifier", clf])
    return dict(dataset=dataset, train=train_figures, classifier=classifier_figures, **figures)


def cifar_dir(args):
    """The CIFAR-10 folder (the official archive, or train/ and test/ image folders, in it or its cifar10/
    subfolder), or Failure."""
    folder = os.path.abspath(args.cifar_dir) if args.cifar_dir else os.path.join(REPO, CIFAR_DIR)  # the commands run in REPO
    if (any(os.path.isfile(os.path.join(place, CIFAR_ARCHIVE)) for place in (folder, os.path.join(folder, "cifar10")))
            or data.dataset_image_folder(data.DATASETS["cifar10"], folder) is not None):
        return folder
    where = f"--cifar-dir {args.cifar_dir}" if args.cifar_dir else f"{CIFAR_DIR} (from the repo root)"
    raise Failure(f"no CIFAR-10 in {where}: place {CIFAR_ARCHIVE} there, or its images as train/<class>/*.jpg "
                  "and test/<class>/*.jpg, or pass --cifar-dir DIR")


def write_cifar_folder(root, per_class):
    """A small synthetic CIFAR-10 image folder: `per_class` random 32×32 JPEGs per class in train/ and test/."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in data.DATASETS["cifar10"].classes:
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.jpg"), quality=95)
    return root


def stage_cifar10(run):
    """The DDPM CIFAR-10 network on real CIFAR-10: train for about --cifar-train-seconds, the metrics classifier
    (or --cifar-classifier), 2,000 fast-sampler samples per w, metrics.py cifar10's table; the npz and the
    checkpoint's metadata are copied into OUT_DIR/cifar10/ for notebook 03."""
    s = dict(run.settings["cifar10"], train_seconds=run.args.cifar_train_seconds)
    if run.args.dry_run:  # a folder of its own, and data.py's decoded-image cache beside it
        os.environ[data.CACHE_ENV] = os.path.join(run.work, "cache")
        folder = write_cifar_folder(os.path.join(run.work, "data"), s["folder_images_per_class"])
    else:
        folder = cifar_dir(run.args)
    data_flags = ["--data-dir", folder]
    steps = training_steps(run, s, "cifar10", run.args.cifar_train_seconds)
    ckpt_path, ckpt, train_figures = train(run, s, "cifar10", data_flags, steps)
    if run.args.cifar_classifier:
        clf = os.path.abspath(run.args.cifar_classifier)  # the commands run in REPO
        classifier_figures = dict(path=clf, given=True)
    else:
        clf, classifier_figures = train_metrics_classifier(run, s, "cifar10", data_flags)
    ws = ["0", "0.3", "1", "2", "4"]
    npz, figures = sample_and_measure(run, s, ckpt_path, ckpt, ws, [PY, "metrics.py", "cifar10", *data_flags,
                                                                    "--classifier", clf, "--device", run.device])
    kept = os.path.join(run.args.out_dir, "cifar10")
    os.makedirs(kept, exist_ok=True)
    shutil.copyfile(npz, os.path.join(kept, "samples.npz"))
    meta = dict(step=int(ckpt["step"]), config=ckpt["config"], args=ckpt["args"],
                losses=[float(v) for v in ckpt["losses"]], checkpoint=ckpt_path)
    write_json(meta, os.path.join(kept, "checkpoint.json"))
    return dict(data_dir=folder, train=dict(**train_figures, preview_steps=s["preview_steps"]),
                classifier=classifier_figures, **figures,
                files=dict(samples="cifar10/samples.npz", checkpoint_meta="cifar10/checkpoint.json"))


def stage_torchrun(run):
    """train.py (DDP, compiled on the GPU) and sample.py as torchrun jobs of one process (NCCL on CUDA, gloo on CPU)."""
    s = run.settings["torchrun"]
    out_dir, steps = os.path.join(run.work, "run"), s["steps"]
    run_command(run, [*torchrun(run), "train.py", "--dataset", "digits", "--out-dir", out_dir, "--max-steps", steps,
                      "--sample-every", steps, "--device", run.device, *run.settings["speed"], *s["train"]], cap=180)
    if only_files(out_dir, "ckpt") != ["ckpt.pt"]:
        raise Failure(f"torchrun train.py left {only_files(out_dir, 'ckpt')} in {out_dir}, not one ckpt.pt")
    ckpt = checkpoint(os.path.join(out_dir, "ckpt.pt"), steps)
    npz = os.path.join(run.work, "samples.npz")
    out, _, _ = run_command(run, [*torchrun(run), "sample.py", "--ckpt", os.path.join(out_dir, "ckpt.pt"),
                                  "--w", "0", "1", *s["sample"], "--npz", npz,
                                  "--out", os.path.join(run.work, "samples.png"), "--device", run.device], cap=180)
    if only_files(run.work, "samples") != ["samples.npz", "samples.png"]:
        raise Failure(f"torchrun sample.py left {only_files(run.work, 'samples')}, not one npz and one png")
    images, seconds, processes = sampling_rate(out)
    if processes != 1:
        raise Failure(f"torchrun --nproc_per_node=1 sample.py ran on {processes} processes")
    config = ckpt["config"]
    samples(npz, [0.0, 1.0], list(range(config["num_classes"])), int(s["sample"][s["sample"].index("--n-per-class") + 1]),
            (config["image_size"], config["image_size"], config["in_channels"]))
    return dict(train_steps=steps, sample_images=images, sample_seconds=seconds)


def stage_resume(run):
    """Ctrl-C after a checkpoint exists (train.py saves and exits 130), then --resume to --max-steps."""
    s = run.settings["resume"]
    out_dir, steps = os.path.join(run.work, "run"), s["steps"]
    command = [PY, "train.py", "--dataset", "digits", "--out-dir", out_dir, "--max-steps", steps,
               "--ckpt-every", s["ckpt_every"], "--sample-every", "0", "--device", run.device, *s["train"]]
    ckpt_path, proc = os.path.join(out_dir, "ckpt.pt"), start(run, command)
    wait_until = min(time.monotonic() + 120, run.deadline)
    while not os.path.exists(ckpt_path) and proc.poll() is None and time.monotonic() < wait_until:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C (a no-op if it has already exited)
    finish(run, proc, cap=60, expect=130)
    interrupted = load_checkpoint(ckpt_path)["step"]
    if not 0 < interrupted < steps:
        raise Failure(f"the interrupted run saved step {interrupted}, not one between 0 and {steps}")
    _, _, seconds = run_command(run, command + ["--resume"], cap=120)
    checkpoint(ckpt_path, steps)
    return dict(interrupted_at_step=interrupted, final_step=steps, resume_seconds=seconds)


STAGES = [("bench", stage_bench), ("fashion", stage_fashion), ("cifar10", stage_cifar10),
          ("torchrun", stage_torchrun), ("resume", stage_resume)]


# ------------------------------------------------------------------ the whole check

def environment():
    """The machine and software the figures belong to."""
    if torch.cuda.is_available():
        try:
            name = torch.cuda.get_device_name(0)
        except RuntimeError as e:  # a broken driver: the preflight and the stages will say more
            name = f"(unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    else:
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            name = "CPU"
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None  # a tuple, or an int in old versions
    return dict(device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), gpus=torch.cuda.device_count(),
                nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
                python=sys.version.split()[0], cpus=os.cpu_count())


def preflight(args, stage_names):
    """What can be known to fail before any GPU time is spent: inputs first, then the machine."""
    if args.work_dir and os.path.isdir(args.work_dir) and os.listdir(args.work_dir):
        raise Failure(f"--work-dir {args.work_dir} is not empty: give a new or empty folder")
    if "fashion" in stage_names and not args.dry_run:
        fashion_dir(args)
    if "cifar10" in stage_names and not args.dry_run:
        cifar_dir(args)
    if "cifar10" in stage_names and args.cifar_classifier and not os.path.isfile(args.cifar_classifier):
        raise Failure(f"no file --cifar-classifier {args.cifar_classifier}")
    if not args.dry_run and not torch.cuda.is_available():
        raise Failure(f"no CUDA device is available (torch {torch.__version__}): run this on a GPU machine, "
                      "or use --dry-run on a CPU")


def write_json(report, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def usage_error(message):  # one line on stderr, exit code 2, as the project's other scripts do
    print(f"gpu_check.py: error: {message} (see python scripts/gpu_check.py --help)", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = usage_error
    p.add_argument("out_dir", help="where gpu_check.json and gpu_check.log are written")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, digits, gloo: a check of this script")
    p.add_argument("--stages", nargs="+", metavar="STAGE", choices=[name for name, _ in STAGES],
                   default=[name for name, _ in STAGES],
                   help="run only these of " + ", ".join(name for name, _ in STAGES) + " (default: all, in that order)")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything; a command still running then "
                   "is stopped and its stage fails (default 480: 8 minutes)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out --compile everywhere (bf16 autocast stays): when there is no time for compiling")
    p.add_argument("--train-seconds", type=float, default=45,
                   help="about how long the fashion stage trains (its --max-steps comes from bench's images/s)")
    p.add_argument("--fashion-dir", help="Fashion-MNIST's IDX files (default: the first of " +
                   ", ".join(FASHION_DIRS) + " that holds them, relative to the repository root)")
    p.add_argument("--cifar-train-seconds", type=float, default=75,
                   help="about how long the cifar10 stage trains (its --max-steps comes from bench's images/s)")
    p.add_argument("--cifar-dir", help=f"CIFAR-10: {CIFAR_ARCHIVE}, or train/<class>/*.jpg and test/<class>/*.jpg "
                   f"(default: {CIFAR_DIR}, relative to the repository root)")
    p.add_argument("--cifar-classifier", metavar="PATH", help="the CIFAR-10 metrics classifier "
                   "(metrics.py train-classifier --dataset cifar10); default: the cifar10 stage trains one")
    p.add_argument("--work-dir", help="checkpoints, samples, data (default: a temporary folder, removed at the end)")
    p.add_argument("--master-port", type=int, help="torchrun's port (default: a free one for each job)")
    return p.parse_args(argv)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too: the running command is stopped and the JSON says where it was


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    stage_names = [name for name, _ in STAGES if name in args.stages]
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log = open(os.path.join(args.out_dir, "gpu_check.log"), "w")
    except OSError as e:
        print(f"gpu_check.py: error: cannot write to {args.out_dir}: {e.strerror}", file=sys.stderr)
        return 2
    json_path = os.path.join(args.out_dir, "gpu_check.json")
    report = dict(command=" ".join(["python", "scripts/gpu_check.py"] + (sys.argv[1:] if argv is None else argv)),
                  started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  mode="dry run (CPU, tiny sizes)" if args.dry_run else "GPU", budget_s=args.budget,
                  environment=environment(), status="running", failure=None, seconds=None,
                  stages={name: dict(status="not run") for name in stage_names})
    run, began = Run(args, log), time.monotonic()
    run.write_log(f"{report['command']}\n{report['started']}  {json.dumps(report['environment'])}")
    write_json(report, json_path)
    work_root = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    try:
        preflight(args, stage_names)
        os.makedirs(work_root, exist_ok=True)
        for name, stage in STAGES:
            if name not in stage_names:
                continue
            print(f"gpu_check: {name} ...", flush=True)
            run.write_log(f"\n======== stage {name}")
            run.work = os.path.join(work_root, name)
            os.makedirs(run.work)
            t0 = time.monotonic()
            try:
                figures = stage(run)
            except BaseException as e:
                if isinstance(e, Failure):
                    reason = str(e)
                elif isinstance(e, KeyboardInterrupt):
                    reason = "interrupted (Ctrl-C or SIGTERM)"
                else:  # a bug here, or an output it did not expect: the traceback goes to the log
                    run.write_log(traceback.format_exc())
                    reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"
                report["stages"][name] = dict(status="failed", seconds=round(time.monotonic() - t0, 1), reason=reason)
                raise Failure(f"stage {name}: {reason}") from None
            run.figures[name] = figures
            report["stages"][name] = dict(status="ok", seconds=round(time.monotonic() - t0, 1), figures=figures)
            print(f"gpu_check: {name} ok ({report['stages'][name]['seconds']:.0f} s)", flush=True)
            write_json(report, json_path)
        report["status"] = "ok"
    except (Failure, KeyboardInterrupt) as e:  # Ctrl-C outside a stage: in the preflight
        report["status"] = "failed"
        report["failure"] = str(e) if isinstance(e, Failure) else "interrupted (Ctrl-C or SIGTERM)"
    finally:
        if not args.work_dir:
            shutil.rmtree(work_root, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - began, 1)
    write_json(report, json_path)
    run.write_log(f"\ngpu_check: {report['status']}" + (f": {report['failure']}" if report["failure"] else "")
                  + f" ({report['seconds']:.0f} s)")
    log.close()
    if report["failure"]:
        print(f"gpu_check.py: error: {report['failure']}", file=sys.stderr)
        return 1
    print(f"gpu_check: all {len(stage_names)} stages ok in {report['seconds']:.0f} s; {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

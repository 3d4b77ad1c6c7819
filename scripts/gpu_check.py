"""One prepared command that runs every CUDA path of the project on a lent GPU, in minutes.

GPU time is short, so one run proves every path with no debugging on the clock: five stages run
the project's commands, each with a time limit, and read the JSON each command writes (--json):

  bench     bench.py --amp --compile --presets mnist cifar10: images/s, MFU, memory, sampling cost
  fashion   train.py on Fashion-MNIST (steps for --train-seconds at bench's images/s), the metrics
            classifier, sample.py --sampler dpmpp2m-sde at w = 0, 1, 3, metrics.py's table
  cifar10   the same on CIFAR-10, w = 0 ... 4; OUT_DIR/cifar10/ keeps samples.npz, checkpoint.json
  torchrun  train.py (DDP) and sample.py (NCCL) as torchrun jobs of one process
  resume    train.py, Ctrl-C once a checkpoint exists (it saves, exits 130), then --resume

    python scripts/gpu_check.py OUT_DIR --cifar-dir DIR [--stages cifar10 resume] [--no-compile]
    OMP_NUM_THREADS=1 python scripts/gpu_check.py OUT_DIR --dry-run   # CPU, tiny sizes, gloo

OUT_DIR gets gpu_check.json (the machine; per stage its status, seconds and figures; rewritten
after every stage) and gpu_check.log (every command and its output). The first failure stops the
run: exit code 1, one line on stderr; missing data (--fashion-dir, --cifar-dir) before any stage.
The default --budget and training times fit a short lease on a fast GPU (docs/results.md).
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import data  # noqa: E402
from model import load_checkpoint  # noqa: E402

PY, TORCHRUN = sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1"]

# What the stages run, on the GPU and in a --dry-run (CPU, tiny); steps: (fewest, most, default).
SETTINGS = {
    "gpu": dict(
        device="cuda", speed="--amp --compile",  # bf16 autocast, torch.compile: the CUDA paths
        bench="--presets mnist cifar10",  # bench.py's own sizes
        fashion=dict(dataset="fashion-mnist", steps=(500, 20_000, 3000), train="",
                     classifier="--epochs 5", sample="--n-per-class 100"),
        cifar10=dict(steps=(200, 50_000, 1500), sample="--n-per-class 200 --batch-size 1000",
                     train="", classifier="--epochs 6"),  # half the default epochs: time is short
        torchrun=dict(steps=200, train="--sample-steps 16", sample="--n-per-class 4 --steps 32"),
        resume=dict(steps=1000, ckpt_every=100, train="--amp")),
    "dry": dict(
        device="cpu", speed="",
        bench="--presets mnist --batch-size 4 --iters 1 --warmup 1 --min-seconds 0 "
              "--sample-iters 1 --sample-batch-size 4 --matmul-sizes 256",
        fashion=dict(dataset="digits", data="--holdout 10", classifier="--epochs 1",  # no test set
                     train="--batch-size 16", steps=(6, 6, 6), sample="--n-per-class 2 --steps 3"),
        cifar10=dict(steps=(1, 1, 1), train="--batch-size 2", sample="--n-per-class 1 --steps 1",
                     classifier="--epochs 1 --batch-size 10"),  # 10 per w: the fewest IS takes
        torchrun=dict(steps=4, train="--batch-size 8 --sample-steps 2",
                      sample="--n-per-class 1 --steps 2"),
        resume=dict(steps=40, ckpt_every=4, train="--batch-size 8")),
}


class Failure(Exception):
    """A check that failed; its message is the one-line reason."""


class Run:
    """What the stages share: settings, log, deadline, folders, the figures of those that passed."""
    def __init__(self, args, log, root=None):
        self.args, self.log, self.root, self.work, self.figures = args, log, root, None, {}
        self.settings = s = SETTINGS["dry" if args.dry_run else "gpu"]
        self.device, self.deadline = s["device"], time.monotonic() + args.budget
        self.speed = s["speed"].replace("--compile", "") if args.no_compile else s["speed"]


def run_command(run, command, cap, json_name=None, expect=0, ctrl_c_once=None):
    """Run a command in the repo root (a process group of its own) at most `cap` seconds and the
    time left, its output into the log; Ctrl-C it once the file `ctrl_c_once` exists. Returns
    (what it wrote to --json STAGE_FOLDER/json_name.json, or None; its seconds), else Failure."""
    path = os.path.join(run.work, f"{json_name}.json") if json_name else None
    command = [str(part) for part in command] + (["--json", path] if path else [])
    name = ("torchrun " if TORCHRUN[2] in command else "") + os.path.basename(
        next(part for part in command if part.endswith(".py")))
    limit = max(0, min(cap, run.deadline - time.monotonic()))
    print("$ " + " ".join(command), file=run.log, flush=True)
    with tempfile.TemporaryFile() as f:  # not a pipe, which a child left behind could hold
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        began = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - began < limit:
                if ctrl_c_once and os.path.exists(ctrl_c_once):
                    proc.send_signal(signal.SIGINT)
                    ctrl_c_once = None
                time.sleep(0.05)
        finally:  # its time is up, or this script's (Ctrl-C): stop it and keep its output
            timed_out = proc.poll() is None
            if timed_out:  # SIGTERM: train.py saves and exits, torchrun passes it on
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=40)
                with contextlib.suppress(ProcessLookupError):  # then whatever it left behind
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            seconds = time.monotonic() - began
            f.seek(0)  # each progress bar (\r between its states) at its last state
            text = f.read().decode(errors="replace").replace("\r\n", "\n").split("\n")
            lines = [line.rstrip("\r").split("\r")[-1] for line in text]
            print(*lines, f"({'stopped, ' * timed_out}exit code {proc.returncode} after "
                  f"{seconds:.1f} s)\n", sep="\n", file=run.log, flush=True)
    if timed_out:
        why = "the --budget ran out" if limit < cap else "its time limit"
        raise Failure(f"{name} did not finish in {limit:.0f} s ({why})")
    if proc.returncode != expect:  # why: its last line that is the project's one-line error
        # or a traceback's end (not torchrun's ChildFailedError: no cause), else its last line
        error = r"^\w+\.py: error: |^[\w.]*(Error|Exception)\b(?<!ChildFailedError)"
        said = [line.strip() for line in lines if line.strip(" =-_")] or ["(no output)"]
        said = [line for line in said if re.search(error, line)] or said
        raise Failure(f"{name} exited with {proc.returncode}"
                      + (f" (expected {expect})" if expect else "") + f": {said[-1][:400]}")
    if not path:
        return None, seconds
    with open(path) as f:
        return json.load(f), seconds


def check_samples(sample, ws, config):
    """sample.py's npz against the w asked for: the grid (w, class, index) of uint8 images."""
    with np.load(sample["npz"]) as f:
        images, labels, w = f["images"], f["labels"], f["w"]
    n, size = sample["n_per_class"], config["image_size"]
    grid = [(float(v), c) for v in ws for c in range(config["num_classes"]) for _ in range(n)]
    if (images.shape != (len(grid), size, size, config["in_channels"])
            or images.min() == images.max() or labels.tolist() != [c for _, c in grid]
            or not np.allclose(w, [v for v, _ in grid])):
        raise Failure(f"{sample['npz']}: {images.shape} images, not the grid, or all one colour")


def find_data(name, folder, flag):
    """`folder` (default: data/) if it or its <name>/ holds the dataset as train.py reads it."""
    dataset, folder = data.DATASETS[name], os.path.abspath(folder or os.path.join(REPO, "data"))
    files = sorted({file for split in dataset.files.values() for file, _ in split})
    if data.dataset_image_folder(dataset, folder) or any(  # image folders, or the official files
            all(os.path.isfile(os.path.join(place, f)) for f in files)
            for place in (os.path.join(folder, name), folder)):
        return folder
    raise Failure(f"no {name} in {flag} {folder}: place {', '.join(files)} there (see --help)")


def write_cifar_folder(root, per_class):
    """A small synthetic CIFAR-10 image folder: `per_class` random 32×32 JPEGs per class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    classes = data.DATASETS["cifar10"].classes
    for folder in [f"{root}/{split}/{name}" for split in ("train", "test") for name in classes]:
        os.makedirs(folder)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{folder}/{i}.jpg")
    return root


def stage_bench(run):
    """bench.py: training and sampling speed per preset; its report is the stage's figures."""
    return run_command(run, [PY, "bench.py", "--device", run.device, *run.speed.split(),
                             *run.settings["bench"].split()], cap=360, json_name="bench")[0]


def real_run(run, s, dataset, data_flags, preset, seconds, ws, metrics, clf=None):
    """train.py for about `seconds` at bench's images/s of `preset`, the metrics classifier (unless
    `clf` is given), sample.py --sampler dpmpp2m-sde at each w, metrics: (figures, checkpoint)."""
    low, high, steps = s["steps"]  # the default: without a bench stage
    for row in run.figures.get("bench", {}).get("train", []):
        if row["preset"] == preset:
            steps = int(min(max(seconds * row["images_per_s"] / row["batch_size"], low), high))
    npz, device = run.work + "/samples.npz", run.device
    train, wall = run_command(run, [
        PY, "train.py", "--dataset", dataset, *data_flags, "--out-dir", run.work + "/run",
        "--max-steps", steps, "--sample-every", 0, "--device", device, *run.speed.split(),
        *s["train"].split()], cap=seconds + 240, json_name="train")
    ckpt, classifier = load_checkpoint(train["checkpoint"]), dict(path=clf, given=True)
    if not clf:
        clf = run.work + "/classifier.pt"
        classifier, _ = run_command(run, [
            PY, "metrics.py", "train-classifier", "--dataset", dataset, *data_flags, "--out", clf,
            "--device", device, *s["classifier"].split()], cap=300, json_name="classifier")
    sample, _ = run_command(run, [
        PY, "sample.py", "--ckpt", train["checkpoint"], "--sampler", "dpmpp2m-sde", "--w", *ws,
        "--npz", npz, "--out", run.work + "/samples.png", "--device", device,
        *s["sample"].split()], cap=300, json_name="sample")
    check_samples(sample, ws, ckpt["config"])
    table, _ = run_command(run, [PY, "metrics.py", *metrics, *data_flags, "--classifier", clf,
                                 "--npz", npz, "--device", device], cap=300, json_name="metrics")
    if sorted(r["w"] for r in table["rows"]) != sorted(map(float, ws)):
        raise Failure(f"metrics.py's table has not one row for each w in {ws}: {table['rows']}")
    return dict(dataset=dataset, train=dict(train, seconds=wall), classifier=classifier,
                sample=sample, metrics=table), ckpt


def stage_fashion(run):
    """Fashion-MNIST (digits in a dry run) at w = 0, 1, 3."""
    s, args = run.settings["fashion"], run.args
    flags = s["data"].split() if args.dry_run else [
        "--data-dir", find_data(s["dataset"], args.fashion_dir, "--fashion-dir")]
    return real_run(run, s, s["dataset"], flags, "mnist", args.train_seconds, "0 1 3".split(),
                    ["mnist", "--dataset", s["dataset"]])[0]


def stage_cifar10(run):
    """CIFAR-10 (a dry run writes a tiny one) at w = 0 ... 4; keeps the npz and checkpoint data."""
    s, args = run.settings["cifar10"], run.args
    if args.dry_run:  # its own image folder, and data.py's decoded-image cache beside it
        os.environ[data.CACHE_ENV] = os.path.join(run.work, "cache")
        folder = write_cifar_folder(os.path.join(run.work, "data"), per_class=2)
    else:
        folder = find_data("cifar10", args.cifar_dir, "--cifar-dir")
    clf = args.cifar_classifier and os.path.abspath(args.cifar_classifier)  # commands run in REPO
    figures, ckpt = real_run(run, s, "cifar10", ["--data-dir", folder], "cifar10",
                             args.cifar_train_seconds, "0 0.3 1 2 4".split(), ["cifar10"], clf)
    files = dict(samples="cifar10/samples.npz", checkpoint_meta="cifar10/checkpoint.json")
    os.makedirs(os.path.join(args.out_dir, "cifar10"), exist_ok=True)  # notebook 03 reads both
    shutil.copyfile(run.work + "/samples.npz", os.path.join(args.out_dir, files["samples"]))
    cli.write_json(os.path.join(args.out_dir, files["checkpoint_meta"]), dict(
        step=ckpt["step"], config=ckpt["config"], args=ckpt["args"],
        losses=ckpt["losses"].tolist(), checkpoint=figures["train"]["checkpoint"]))
    return dict(figures, data_dir=folder, files=files)


def stage_torchrun(run):
    """train.py (DDP) with a preview grid, and sample.py, as torchrun jobs of one process."""
    s, out_dir, port = run.settings["torchrun"], run.work + "/run", run.args.master_port
    torchrun = TORCHRUN + ([f"--master_port={port}"] if port else ["--standalone"])  # a free port
    train, _ = run_command(run, [
        *torchrun, "train.py", "--dataset", "digits", "--out-dir", out_dir, "--max-steps",
        s["steps"], "--sample-every", s["steps"], "--device", run.device, *run.speed.split(),
        *s["train"].split()], cap=180, json_name="train")
    sample, _ = run_command(run, [
        *torchrun, "sample.py", "--ckpt", train["checkpoint"], "--w", "0", "1", "--npz",
        run.work + "/samples.npz", "--out", run.work + "/samples.png", "--device", run.device,
        *s["sample"].split()], cap=180, json_name="sample")
    grid = f"{out_dir}/samples_{s['steps']:07d}.png"  # train.py's preview at its last step
    if not os.path.isfile(grid) or train["processes"] != 1 or sample["processes"] != 1:
        raise Failure(f"torchrun: no {grid}, or not one process: {train}, {sample}")
    return dict(train=train, sample=sample)


def stage_resume(run):
    """Ctrl-C once a checkpoint exists (train.py saves and exits 130), then --resume."""
    s, ckpt = run.settings["resume"], run.work + "/run/ckpt.pt"
    command = [PY, "train.py", "--dataset", "digits", "--out-dir", run.work + "/run",
               "--max-steps", s["steps"], "--ckpt-every", s["ckpt_every"], "--sample-every", 0,
               "--device", run.device, *s["train"].split()]
    run_command(run, command, cap=180, expect=130, ctrl_c_once=ckpt)
    interrupted = load_checkpoint(ckpt)["step"]
    resumed, seconds = run_command(run, [*command, "--resume"], cap=120, json_name="train")
    if not 0 < interrupted < s["steps"] == resumed["steps_this_run"] + interrupted:
        raise Failure(f"train.py saved step {interrupted} at Ctrl-C; then --resume: {resumed}")
    return dict(interrupted_at_step=interrupted, resume_seconds=seconds, train=resumed)


STAGES = dict(bench=stage_bench, fashion=stage_fashion, cifar10=stage_cifar10,
              torchrun=stage_torchrun, resume=stage_resume)


def parse_args(argv):
    p = cli.parser("gpu_check.py", __doc__)
    p.add_argument("out_dir", help="where gpu_check.json and gpu_check.log are written")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, digits, gloo")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    seconds = cli.number(float, 0)
    p.add_argument("--budget", type=seconds, default=480, help="for everything (default 480)")
    p.add_argument("--no-compile", action="store_true", help="no --compile: no time to compile")
    p.add_argument("--train-seconds", type=seconds, default=45, help="the fashion stage's training")
    p.add_argument("--cifar-train-seconds", type=seconds, default=75, help="the cifar10 stage's")
    p.add_argument("--fashion-dir", help="IDX files, in it or its fashion-mnist/ (default: data)")
    p.add_argument("--cifar-dir", help="archive or image folders, in it or its cifar10/ (or data)")
    p.add_argument("--cifar-classifier", help="default: the cifar10 stage trains one")
    p.add_argument("--work-dir", help="checkpoints, samples, data (default: a temporary folder)")
    p.add_argument("--master-port", type=int, help="torchrun's port (default: a free one)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop, say where
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log = open(os.path.join(args.out_dir, "gpu_check.log"), "w")
    except OSError as e:
        cli.fail(f"cannot write to {args.out_dir}: {e.strerror}", prog="gpu_check.py")
    cuda, json_path = torch.cuda.is_available(), os.path.join(args.out_dir, "gpu_check.json")
    report = dict(
        command=" ".join(["python scripts/gpu_check.py", *(argv or sys.argv[1:])]),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), budget_s=args.budget, status="running",
        mode="dry run (CPU, tiny sizes)" if args.dry_run else "GPU", failure=None, seconds=None,
        environment=dict(device_name=torch.cuda.get_device_name(0) if cuda else "CPU",
                         torch=torch.__version__, cuda=torch.version.cuda),
        stages={name: dict(status="not run") for name in STAGES if name in args.stages})
    run = Run(args, log, os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")))
    cli.write_json(json_path, report)
    try:  # first what can fail before any GPU time is spent: the inputs, then the machine
        if "fashion" in report["stages"] and not args.dry_run:
            find_data("fashion-mnist", args.fashion_dir, "--fashion-dir")
        if "cifar10" in report["stages"] and not args.dry_run:
            find_data("cifar10", args.cifar_dir, "--cifar-dir")
        if args.cifar_classifier and not os.path.isfile(args.cifar_classifier):
            raise Failure(f"no file --cifar-classifier {args.cifar_classifier}")
        if not args.dry_run and not cuda:
            raise Failure(f"no CUDA device (torch {torch.__version__}): use --dry-run on a CPU")
        for name in report["stages"]:  # each in a new folder of its own: --work-dir must be empty
            print(f"\n======== stage {name}", file=log, flush=True)
            run.work, began, entry = os.path.join(run.root, name), time.monotonic(), {}
            try:
                os.makedirs(run.work)
                run.figures[name] = entry["figures"] = STAGES[name](run)
            except (Failure, KeyboardInterrupt) as e:
                entry["reason"] = str(e) or "interrupted (Ctrl-C or SIGTERM)"
            except Exception as e:  # a bug here, or an output it did not expect: log the traceback
                print(traceback.format_exc(), file=log, flush=True)
                entry["reason"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            status, seconds = "failed" if "reason" in entry else "ok", time.monotonic() - began
            entry = report["stages"][name] = dict(status=status, seconds=round(seconds, 1), **entry)
            cli.write_json(json_path, report)
            print(f"gpu_check: {name} {entry['status']} ({entry['seconds']:.0f} s)", flush=True)
            if "reason" in entry:
                raise Failure(f"stage {name}: {entry['reason']}")
        report["status"] = "ok"
    except (Failure, KeyboardInterrupt) as e:  # Ctrl-C outside a stage: during the checks
        report.update(status="failed", failure=str(e) or "interrupted (Ctrl-C or SIGTERM)")
    finally:
        if not args.work_dir:
            shutil.rmtree(run.root, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - run.deadline + args.budget, 1)  # since the start
    cli.write_json(json_path, report)
    log.close()
    if report["failure"]:
        print(f"gpu_check.py: error: {report['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

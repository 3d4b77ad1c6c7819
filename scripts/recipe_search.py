"""Time-to-quality search for the CPU presets: which network and training settings give the best
samples per minute of CPU training (docs/results.md, "A recipe for CPU minutes").

Each candidate is a U-Net config (model.UNetConfig) and train.py flags. `train` trains it with train.py
itself, with the candidate added as one more preset (presets.py) in that process, in segments
that end at the given minutes (calibrated from its first 100 steps; `--resume` continues each segment
exactly, so the checkpoint at each milestone is the one a single run of that many steps writes), and
lists the milestones in trained.jsonl. `evaluate` draws --n samples from each milestone's EMA weights
(balanced classes, the same noise for every candidate and milestone) with the fast sampler at the given
w, scored with the project's metrics classifier against held-out real images (metrics.load_splits),
the real-data floor at the same count beside them (results.jsonl). `time` measures each candidate's
milliseconds per training step in one process with this process's threads (run it on a quiet machine),
and `report` prints the table and draws the plot with minutes = steps × ms/step, so that what else
shared the machine during training does not enter the figures.

    python metrics.py train-classifier --dataset mnist --data-dir data/mnist-4k
    OMP_NUM_THREADS=1 python scripts/recipe_search.py train --data-dir data/mnist-4k \
        --candidates tiny shallow-b64 --minutes 6 12 24 --out out/recipes
    OMP_NUM_THREADS=1 python scripts/recipe_search.py train ... --candidates tiny-b32 --train-steps 4500 7500  # continue
    OMP_NUM_THREADS=1 python scripts/recipe_search.py evaluate --data-dir data/mnist-4k --w 0 --out out/recipes
    python scripts/recipe_search.py time --data-dir data/mnist-4k --out out/recipes    # 2 threads
    python scripts/recipe_search.py report --data-dir data/mnist-4k --out out/recipes  # -> docs/recipes.png

CIFAR-10 (32×32 colour) has candidates of its own, named cifar-*, trained with CPU-sized settings (the cifar10
preset's defaults are the DDPM GPU recipe) and scored by the CIFAR-10 metrics classifier against the test split:

    python metrics.py train-classifier --dataset cifar10 --data-dir DIR
    OMP_NUM_THREADS=1 python scripts/recipe_search.py train --dataset cifar10 --data-dir DIR --minutes 20 40 80
    OMP_NUM_THREADS=1 python scripts/recipe_search.py evaluate --dataset cifar10 --data-dir DIR --w 1 3
    python scripts/recipe_search.py report --dataset cifar10 --data-dir DIR --report-w 1 3 --plot docs/recipes_cifar10.png

(data/mnist-4k: 4,000 real MNIST training digits, 400 per class; scripts/make_mnist_subset.py makes it.) `report`
reads results.jsonl and timings.json from --out; docs/recipes.jsonl and docs/recipes_timings.json are the
committed copies of the run in docs/results.md.

Report bench.py's matmul rate beside the minutes.
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data  # noqa: E402
import fast_cpu  # noqa: E402
import metrics  # noqa: E402
from model import UNetConfig, load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import FAST_SAMPLER, sample  # noqa: E402

CANDIDATES = {  # name -> (UNetConfig fields, train.py flags); 28×28 single-channel
    "baseline": (dict(channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(7,), dropout=0.1),
                 ["--batch-size", "32", "--lr", "1e-3"]),
    "shallow": (dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,), dropout=0.1),
                ["--batch-size", "32", "--lr", "1e-3"]),
    "shallow-b64": (dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,), dropout=0.0),
                    ["--batch-size", "64", "--lr", "2e-3"]),
    "wide": (dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,), dropout=0.1),
             ["--batch-size", "32", "--lr", "1e-3"]),
    "tiny": (dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(7,), dropout=0.0),
             ["--batch-size", "64", "--lr", "2e-3"]),
    "micro": (dict(channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(7,), dropout=0.0),
              ["--batch-size", "64", "--lr", "2e-3"]),  # notebook 05's smaller bad model for autoguidance
    "tiny-b32": (dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(7,), dropout=0.0),
                 ["--batch-size", "32", "--lr", "1e-3"]),
}
# 32×32 colour (--dataset cifar10). train.py's cifar10 defaults are the DDPM GPU recipe (lr 2e-4, 5,000 warm-up
# steps, no EMA ramp), so each candidate brings the CPU presets' settings: a short warm-up and the EMA ramp.
CPU = ["--warmup-steps", "100", "--ema-warmup"]
CIFAR_CANDIDATES = {
    "cifar-tiny": (dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0),
                   ["--batch-size", "64", "--lr", "2e-3", *CPU]),  # the mnist preset at 32×32 colour
    "cifar-small": (dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.1),
                    ["--batch-size", "64", "--lr", "1e-3", *CPU]),
    "cifar-wide": (dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.1),
                   ["--batch-size", "32", "--lr", "5e-4", *CPU]),
    "cifar-tiny-b32": (dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0),
                       ["--batch-size", "32", "--lr", "1e-3", *CPU]),
}


CANDIDATES_BY_SHAPE = {(1, 28, 28): CANDIDATES, (3, 32, 32): CIFAR_CANDIDATES}  # (C, H, W)
SEARCHED = [d.name for d in data.DATASETS.values() if tuple(d.shape) in CANDIDATES_BY_SHAPE]


def candidates(dataset):
    """The candidates for this dataset's image shape: name -> (UNetConfig fields, train.py flags)."""
    return CANDIDATES_BY_SHAPE[tuple(data.DATASETS[dataset].shape)]


def shape_fields(dataset):
    """The UNetConfig fields that a dataset fixes: image size, channels, classes."""
    channels, size, _ = data.DATASETS[dataset].shape
    return dict(image_size=size, in_channels=channels, num_classes=len(data.DATASETS[dataset].classes))


# train.main in a process where the candidate is one more preset (its network: argv[1], JSON), with
# the recipe of the dataset's own preset, which the candidate's flags override.
TRAIN_CANDIDATE = """
import json, sys
sys.path.insert(0, {repo!r})
import data, model, presets, train
network = model.config_from_dict(json.loads(sys.argv[1]))
recipe = presets.PRESETS[data.DATASETS[{dataset!r}].preset].recipe
presets.PRESETS["candidate"] = presets.Preset("candidate", network, recipe)
train.main(sys.argv[2:] + ["--preset", "candidate"])
"""


def train_until(config, flags, dataset, data_dir, out, steps):
    """Train (or continue) the candidate's run in `out` to `steps` steps; returns the wall seconds it took."""
    resume = ["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else []
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", TRAIN_CANDIDATE.format(repo=REPO, dataset=dataset), json.dumps(config),
                          "--dataset", dataset, "--data-dir", data_dir, "--out-dir", out, "--max-steps", str(steps),
                          "--sample-every", "0", "--ckpt-every", "100000", *flags, *resume],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"recipe_search.py: training failed: {run.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def evaluate(ckpt_path, clf, ref_feats, n, ws, sampler, steps, seed=0):
    """FID / IS / accuracy (the project's metrics classifier) of n samples (n/10 per class) per w, the same noise for every checkpoint."""
    model = model_from_checkpoint(load_checkpoint(ckpt_path), "ema").eval()
    labels = torch.arange(10).repeat_interleave(n // 10)
    results = {}
    for w in ws:
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(labels))]
        x = torch.cat([sample(model, labels[i:i + 250], w, steps, sampler, generator=generators[i:i + 250])
                       for i in range(0, len(labels), 250)])
        results[w] = metrics.classifier_metrics(clf, x, labels, ref_feats)
    return results


def train_candidates(args):
    """Train each candidate to its milestones; one line per milestone in trained.jsonl (no sampling here)."""
    os.makedirs(args.out, exist_ok=True)
    for name in args.candidates:
        fields, flags = candidates(args.dataset)[name]
        config = dataclasses.asdict(UNetConfig(**shape_fields(args.dataset), **fields))
        out = os.path.join(args.out, args.dataset, name)
        if args.train_steps:  # milestones in steps: continue the run in `out` (exactly, by --resume) if there is one
            milestones = args.train_steps
        else:  # milestones in minutes of this process, calibrated afresh
            shutil.rmtree(out, ignore_errors=True)
            # Seconds per step: runs to 10 and on to 110 steps cost start-up + 10 and start-up + 100 steps.
            first = train_until(config, flags, args.dataset, args.data_dir, out, 10)
            step_s = (train_until(config, flags, args.dataset, args.data_dir, out, 110) - first) / 100
            if step_s <= 0:
                raise SystemExit(f"recipe_search.py: could not time {name}'s steps (start-up noise); run it again")
            shutil.rmtree(out)
            milestones = [int(minutes * 60 / step_s) for minutes in args.minutes]
        trained_s, done = 0.0, 0
        for steps in milestones:
            steps = max(done + 1, steps)
            trained_s += train_until(config, flags, args.dataset, args.data_dir, out, steps)
            done = steps
            milestone = os.path.join(out, f"ckpt_{steps:06d}.pt")
            shutil.copyfile(os.path.join(out, "ckpt.pt"), milestone)
            row = dict(candidate=name, dataset=args.dataset, config=config, flags=flags, steps=steps,
                       train_minutes=None if args.train_steps else trained_s / 60,  # with --train-steps: unknown
                       threads=torch.get_num_threads(), ckpt=os.path.relpath(milestone, REPO),
                       params=sum(v.numel() for v in load_checkpoint(milestone)["ema"].values()))
            with open(os.path.join(args.out, "trained.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:12s} {steps:6d} steps {trained_s / 60:6.1f} min", flush=True)


def evaluate_milestones(args):
    """Score every milestone in trained.jsonl not yet in results.jsonl with this sampler and these w."""
    fast_cpu.keep_freed_memory()  # this process only samples, as sample.py
    clf = metrics.load_classifier(args.classifier or metrics.default_classifier_path(args.dataset))
    splits = metrics.load_splits(args.dataset, args.data_dir)
    (ref_x, _), (floor_x, floor_y) = metrics.reference_and_floor(*splits["held"])
    ref_feats = metrics.classifier_features(clf, ref_x)
    floor = metrics.real_floor(clf, floor_x, floor_y, ref_feats, args.n)
    print(f"real-data floor at n = {args.n}: FID {floor['fid']:.2f}, IS {floor['is']:.2f}, accuracy {floor['accuracy']:.3f}",
          flush=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(results_path):
        done = {(r["ckpt"], r["sampler"], r["sampling_steps"]) for r in map(json.loads, open(results_path))}
    for row in map(json.loads, open(os.path.join(args.out, "trained.jsonl"))):
        if (row["dataset"] != args.dataset or row["candidate"] not in args.candidates
                or (row["ckpt"], args.sampler, args.steps) in done):
            continue
        t = time.perf_counter()
        results = evaluate(os.path.join(REPO, row["ckpt"]), clf, ref_feats, args.n, args.w, args.sampler, args.steps)
        row.update(n=args.n, sampler=args.sampler, sampling_steps=args.steps, floor=floor,
                   eval_threads=torch.get_num_threads(), results={str(w): r for w, r in results.items()})
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['candidate']:12s} {row['steps']:6d} steps  " + "  ".join(
            f"w={w:g}: FID {r['fid']:6.2f} acc {r['accuracy']:.3f}" for w, r in results.items())
            + f"  (eval {time.perf_counter() - t:.0f} s)", flush=True)


def time_candidates(args):
    """Milliseconds per training step of each candidate in this process (its threads), on a batch of noise, as
    train.py runs it (train.train_step with the candidate's flags); written to timings.json."""
    import copy

    import train
    from model import UNet
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "timings.json")
    timings = json.load(open(path)) if os.path.exists(path) else {}
    for name in args.candidates:
        fields, flags = candidates(args.dataset)[name]
        train_args = train.parse_args(["--dataset", args.dataset, "--data-dir", args.data_dir, *flags])
        shape = shape_fields(args.dataset)
        net = UNet(UNetConfig(**shape, **fields))
        ema, optimizer = copy.deepcopy(net), torch.optim.Adam(net.parameters(), lr=train_args.lr)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(train_args.batch_size, shape["in_channels"], shape["image_size"], shape["image_size"],
                       generator=g) * 2 - 1
        labels = torch.randint(0, 10, (train_args.batch_size,), generator=g)
        seconds = []
        for step in range(25):  # 5 warm-up steps, then the median of 20
            start = time.perf_counter()
            train.train_step(net, ema, optimizer, x, labels, 10, step, train_args)
            seconds.append(time.perf_counter() - start)
        timings[name] = dict(ms_per_step=1000 * sorted(seconds[5:])[10], threads=torch.get_num_threads())
        print(f"{name:12s} {timings[name]['ms_per_step']:7.1f} ms/step at {torch.get_num_threads()} thread(s)", flush=True)
    with open(path, "w") as f:
        json.dump(timings, f, indent=1)


def report(args):
    """The recipe table (markdown) and the quality-against-minutes plot at each w of --report-w (solid, dashed, ...):
    minutes are steps × the candidate's ms/step from timings.json (training alone, no contention), so they do not
    depend on what else ran."""
    timings = json.load(open(os.path.join(args.out, "timings.json")))
    rows = [r for r in map(json.loads, open(os.path.join(args.out, "results.jsonl")))
            if r["dataset"] == args.dataset and r["candidate"] in timings]
    if not rows:
        raise SystemExit(f"recipe_search.py: no scored {args.dataset} milestone with a timing in {args.out}: run "
                         "evaluate and time first")
    ws = [str(float(w)) for w in args.report_w]
    missing = sorted({w for r in rows for w in ws if w not in r["results"]})
    if missing:
        raise SystemExit(f"recipe_search.py: no results at w = {', '.join(missing)} in {args.out}/results.jsonl: "
                         "evaluate with these --w, or report the w it has")
    floor = rows[0]["floor"]
    print(f"real data (n = {rows[0]['n']}): FID {floor['fid']:.2f}, accuracy {floor['accuracy']:.3f}\n")
    at = [f"{key} (w = {float(w):g})" for w in ws for key in ("FID", "accuracy")]
    print("| candidate | network | batch, lr | params | ms/step | steps | minutes | " + " | ".join(at) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(at))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, name in enumerate(c for c in candidates(args.dataset) if c in {r["candidate"] for r in rows}):
        mine = sorted((r for r in rows if r["candidate"] == name), key=lambda r: r["steps"])
        ms = timings[name]["ms_per_step"]
        c = mine[0]["config"]
        for r in mine:
            scores = " | ".join(f"{r['results'][w]['fid']:.1f} | {r['results'][w]['accuracy']:.3f}" for w in ws)
            print(f"| {name} | {c['channels']} ch × {tuple(c['channel_mult'])}, {c['num_res_blocks']} block(s), dropout "
                  f"{c['dropout']} | {r['flags'][1]}, {r['flags'][3]} | {r['params'] / 1e6:.2f}M | {ms:.0f} | {r['steps']} | "
                  f"{r['steps'] * ms / 60000:.1f} | {scores} |")
        minutes = [r["steps"] * ms / 60000 for r in mine]
        for ax, key in zip(axes, ("fid", "accuracy")):
            for style, w in zip(("o-", "s--", "^:", "v-."), ws):
                ax.plot(minutes, [r["results"][w][key] for r in mine], style, color=f"C{k}",
                        label=name if len(ws) == 1 else f"{name}, w = {float(w):g}")
    for ax, key in zip(axes, ("fid", "accuracy")):
        ax.axhline(floor[key], ls="--", c="gray", label="real data")
        ax.set(xlabel=f"training minutes ({next(iter(timings.values()))['threads']} threads, this machine)",
               ylabel=f"{key} at w = " + ", ".join(f"{float(w):g}" for w in ws),
               yscale="log" if key == "fid" else "linear")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)
    print(f"\nplot: {args.plot}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["train", "evaluate", "time", "report"])
    p.add_argument("--dataset", default="mnist", choices=SEARCHED)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--candidates", nargs="+", choices=[*CANDIDATES, *CIFAR_CANDIDATES],
                   help="default: every candidate of the dataset's shape (cifar10: the cifar-* ones)")
    p.add_argument("--minutes", type=float, nargs="+", default=[4, 8, 16, 24], help="milestones, training minutes")
    p.add_argument("--train-steps", type=int, nargs="+", help="milestones in steps instead of --minutes; an existing run of "
                   "the candidate is continued (train.py --resume), not restarted")
    p.add_argument("--n", type=int, default=1000, help="samples per w at each milestone (balanced classes)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sampler", default=FAST_SAMPLER)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    p.add_argument("--classifier", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--out", default=os.path.join(REPO, "out", "recipes"))
    p.add_argument("--report-w", type=float, nargs="+", default=[0.0], help="report: the w of the table and plot")
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "recipes.png"))
    args = p.parse_args()
    fitting = candidates(args.dataset)
    args.candidates = args.candidates or list(fitting)
    wrong = [c for c in args.candidates if c not in fitting]
    if wrong:
        p.error(f"not a {args.dataset} candidate: {', '.join(wrong)}; choose from {', '.join(fitting)}")
    dict(train=train_candidates, evaluate=evaluate_milestones, time=time_candidates, report=report)[args.command](args)


if __name__ == "__main__":
    main()

"""Time-to-quality search for the CPU presets: which network and training settings give the best
samples per minute of CPU training (docs/results.md, "A recipe for CPU minutes").

A candidate is UNetConfig fields and train.py flags. `train` runs train.py with it as one more
preset to milestones at --minutes (calibrated on its first steps; --resume continues exactly):
trained.jsonl. `evaluate` scores each milestone's EMA samples (the fast sampler at each --w,
balanced classes, the same noise for all) with the metrics classifier, beside the real-data
floor: results.jsonl. `time` measures ms per training step in one quiet process, and `report`
prints the table and plot with minutes = steps × ms/step, so that whatever shared the machine
while training does not enter them; quote bench.py's matmul rate beside them. cifar10 has its
own cifar-* candidates with CPU settings; scripts/make_mnist_subset.py makes data/mnist-4k.
docs/recipes.jsonl and docs/recipes_timings.json: results.md's results.jsonl and timings.json.

    python metrics.py train-classifier --dataset mnist --data-dir data/mnist-4k
    OMP_NUM_THREADS=1 python scripts/recipe_search.py train --data-dir data/mnist-4k \
        --candidates tiny shallow-b64 --minutes 6 12 24     # or --train-steps: continue
    OMP_NUM_THREADS=1 python scripts/recipe_search.py evaluate --data-dir data/mnist-4k --w 0
    python scripts/recipe_search.py time --data-dir data/mnist-4k     # with all its threads
    python scripts/recipe_search.py report --data-dir data/mnist-4k   # -> docs/recipes.png
    python scripts/recipe_search.py report --dataset cifar10 --data-dir DIR --report-w 1 3 \
        --plot docs/recipes_cifar10.png   # each command alike with --dataset cifar10
"""
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

import cli  # noqa: E402
import data  # noqa: E402
import fast_cpu  # noqa: E402
import metrics  # noqa: E402
from model import UNetConfig, load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import FAST_SAMPLER, sample  # noqa: E402


def candidate(channels, channel_mult, num_res_blocks, dropout, attention, batch_size, lr, *flags):
    """(UNetConfig fields, train.py flags); the dataset fixes the image shape and classes."""
    fields = dict(channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                  attention_resolutions=(attention,), dropout=dropout)
    return fields, ["--batch-size", batch_size, "--lr", lr, *flags]


# name: (channels, channel_mult, num_res_blocks, dropout, attention at H, batch, lr, flags)
CANDIDATES = {  # 28×28 single-channel
    "baseline": candidate(32, (1, 2, 4), 2, 0.1, 7, "32", "1e-3"),
    "shallow": candidate(32, (1, 2, 2), 1, 0.1, 7, "32", "1e-3"),
    "shallow-b64": candidate(32, (1, 2, 2), 1, 0.0, 7, "64", "2e-3"),
    "wide": candidate(64, (1, 2, 2), 1, 0.1, 7, "32", "1e-3"),
    "tiny": candidate(16, (1, 2, 4), 1, 0.0, 7, "64", "2e-3"),
    "micro": candidate(8, (1, 2, 4), 1, 0.0, 7, "64", "2e-3"),  # notebook 05's bad model
    "tiny-b32": candidate(16, (1, 2, 4), 1, 0.0, 7, "32", "1e-3"),
}
# 32×32 colour (--dataset cifar10). train.py's cifar10 defaults are the DDPM GPU recipe, so each
# candidate brings the CPU presets' settings: a short warm-up and the EMA ramp.
CPU = ["--warmup-steps", "100", "--ema-warmup"]
CIFAR_CANDIDATES = {
    "cifar-tiny": candidate(16, (1, 2, 4), 1, 0.0, 8, "64", "2e-3", *CPU),  # mnist's, in colour
    "cifar-small": candidate(32, (1, 2, 2), 1, 0.1, 8, "64", "1e-3", *CPU),
    "cifar-wide": candidate(64, (1, 2, 2), 1, 0.1, 8, "32", "5e-4", *CPU),
    "cifar-tiny-b32": candidate(16, (1, 2, 4), 1, 0.0, 8, "32", "1e-3", *CPU),
}


CANDIDATES_BY_SHAPE = {(1, 28, 28): CANDIDATES, (3, 32, 32): CIFAR_CANDIDATES}  # (C, H, W)
SEARCHED = [d.name for d in data.DATASETS.values() if tuple(d.shape) in CANDIDATES_BY_SHAPE]


def candidates(dataset):
    """This dataset's image shape's candidates: name -> (UNetConfig fields, train.py flags)."""
    return CANDIDATES_BY_SHAPE[tuple(data.DATASETS[dataset].shape)]


def shape_fields(dataset):
    """The UNetConfig fields that a dataset fixes: image size, channels, classes."""
    channels, size, _ = data.DATASETS[dataset].shape
    classes = len(data.DATASETS[dataset].classes)
    return dict(image_size=size, in_channels=channels, num_classes=classes)


# train.main in a process where the candidate is one more preset (its network: argv[1], JSON),
# with the recipe of the dataset's own preset, which the candidate's flags override.
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
    """Train (or continue) the candidate's run in `out` to `steps` steps; its wall seconds."""
    resume = ["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else []
    code = TRAIN_CANDIDATE.format(repo=REPO, dataset=dataset)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, json.dumps(config), "--dataset", dataset,
                          "--data-dir", data_dir, "--out-dir", out, "--max-steps", str(steps),
                          "--sample-every", "0", "--ckpt-every", "100000", *flags, *resume],
                         capture_output=True, text=True)
    if run.returncode:
        last = run.stderr.strip().splitlines()[-1]
        raise SystemExit(f"recipe_search.py: training failed: {last}")
    return time.perf_counter() - start


def evaluate(ckpt_path, clf, ref_feats, n, ws, sampler, steps, seed=0):
    """FID / IS / accuracy (the metrics classifier) of n samples (n/K a class) per w, with the
    same noise for every checkpoint."""
    model = model_from_checkpoint(load_checkpoint(ckpt_path), "ema").eval()
    k = model.config.num_classes
    labels = torch.arange(k).repeat_interleave(n // k)
    results = {}
    for w in ws:
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i)
                      for i in range(len(labels))]
        x = torch.cat([sample(model, labels[i:i + 250], w, steps, sampler,
                              generator=generators[i:i + 250])
                       for i in range(0, len(labels), 250)])
        results[w] = metrics.classifier_metrics(clf, x, labels, ref_feats)
    return results


def train_candidates(args):
    """Train each candidate to its milestones, a line each in trained.jsonl (no sampling)."""
    os.makedirs(args.out, exist_ok=True)
    for name in args.candidates:
        fields, flags = candidates(args.dataset)[name]
        config = dataclasses.asdict(UNetConfig(**shape_fields(args.dataset), **fields))
        out = os.path.join(args.out, args.dataset, name)
        if args.train_steps:  # in steps: continue the run in `out` (exactly, by --resume)
            milestones = args.train_steps
        else:  # in minutes of this process, calibrated afresh
            shutil.rmtree(out, ignore_errors=True)
            # Runs to 10 and on to 110 steps cost start-up + 10 and start-up + 100 steps.
            first = train_until(config, flags, args.dataset, args.data_dir, out, 10)
            second = train_until(config, flags, args.dataset, args.data_dir, out, 110)
            step_s = (second - first) / 100
            if step_s <= 0:
                raise SystemExit(f"recipe_search.py: could not time {name}'s steps "
                                 "(start-up noise); run it again")
            shutil.rmtree(out)
            milestones = [int(minutes * 60 / step_s) for minutes in args.minutes]
        trained_s, done = 0.0, 0
        for steps in milestones:
            steps = max(done + 1, steps)
            trained_s += train_until(config, flags, args.dataset, args.data_dir, out, steps)
            done = steps
            milestone = os.path.join(out, f"ckpt_{steps:06d}.pt")
            shutil.copyfile(os.path.join(out, "ckpt.pt"), milestone)
            params = sum(v.numel() for v in load_checkpoint(milestone)["ema"].values())
            row = dict(candidate=name, dataset=args.dataset, config=config, flags=flags,
                       steps=steps, train_minutes=None if args.train_steps else trained_s / 60,
                       threads=torch.get_num_threads(), ckpt=os.path.relpath(milestone, REPO),
                       params=params)  # train_minutes: unknown with --train-steps
            with open(os.path.join(args.out, "trained.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:12s} {steps:6d} steps {trained_s / 60:6.1f} min", flush=True)


def evaluate_milestones(args):
    """Score each milestone of trained.jsonl not yet in results.jsonl at this sampler and w."""
    fast_cpu.keep_freed_memory()  # this process only samples, as sample.py
    clf = metrics.load_classifier(metrics.classifier_path(args.dataset, args.classifier))
    splits = metrics.load_splits(args.dataset, args.data_dir)
    (ref_x, _), (floor_x, floor_y) = metrics.reference_and_floor(*splits["held"])
    ref_feats = metrics.classifier_features(clf, ref_x)
    floor = metrics.real_floor(clf, floor_x, floor_y, ref_feats, args.n)
    print(f"real-data floor at n = {args.n}: FID {floor['fid']:.2f}, IS {floor['is']:.2f}, "
          f"accuracy {floor['accuracy']:.3f}", flush=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(results_path):
        done = {(r["ckpt"], r["sampler"], r["sampling_steps"])
                for r in map(json.loads, open(results_path))}
    for row in map(json.loads, open(os.path.join(args.out, "trained.jsonl"))):
        if (row["dataset"] != args.dataset or row["candidate"] not in args.candidates
                or (row["ckpt"], args.sampler, args.steps) in done):
            continue
        t = time.perf_counter()
        results = evaluate(os.path.join(REPO, row["ckpt"]), clf, ref_feats, args.n, args.w,
                           args.sampler, args.steps)
        row.update(n=args.n, sampler=args.sampler, sampling_steps=args.steps, floor=floor,
                   eval_threads=torch.get_num_threads(),
                   results={str(w): r for w, r in results.items()})
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scores = "  ".join(f"w={w:g}: FID {r['fid']:6.2f} acc {r['accuracy']:.3f}"
                           for w, r in results.items())
        print(f"{row['candidate']:12s} {row['steps']:6d} steps  {scores}"
              f"  (eval {time.perf_counter() - t:.0f} s)", flush=True)


def time_candidates(args):
    """Milliseconds per training step of each candidate in this process (its threads), on a
    batch of noise, as train.py runs it (train_step, the candidate's flags): timings.json."""
    import copy

    import train
    from model import UNet
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "timings.json")
    timings = json.load(open(path)) if os.path.exists(path) else {}
    for name in args.candidates:
        fields, flags = candidates(args.dataset)[name]
        train_args = train.parse_args(["--dataset", args.dataset, "--data-dir", args.data_dir,
                                       *flags])
        shape = shape_fields(args.dataset)
        net = UNet(UNetConfig(**shape, **fields))
        ema, optimizer = copy.deepcopy(net), torch.optim.Adam(net.parameters(), lr=train_args.lr)
        g = torch.Generator().manual_seed(0)
        batch, size = train_args.batch_size, shape["image_size"]
        x = torch.rand(batch, shape["in_channels"], size, size, generator=g) * 2 - 1
        k = shape["num_classes"]
        labels = torch.randint(0, k, (batch,), generator=g)
        seconds = []
        for step in range(25):  # 5 warm-up steps, then the median of 20
            start = time.perf_counter()
            train.train_step(net, ema, optimizer, x, labels, k, step, train_args)
            seconds.append(time.perf_counter() - start)
        threads = torch.get_num_threads()
        timings[name] = dict(ms_per_step=1000 * sorted(seconds[5:])[10], threads=threads)
        print(f"{name:12s} {timings[name]['ms_per_step']:7.1f} ms/step at {threads} thread(s)",
              flush=True)
    with open(path, "w") as f:
        json.dump(timings, f, indent=1)


def report(args):
    """The recipe table (markdown) and the plot of quality against minutes at each --report-w
    (solid, dashed, ...): minutes are steps × ms/step of timings.json (training alone), so they
    do not depend on what else ran."""
    timings = json.load(open(os.path.join(args.out, "timings.json")))
    rows = [r for r in map(json.loads, open(os.path.join(args.out, "results.jsonl")))
            if r["dataset"] == args.dataset and r["candidate"] in timings]
    if not rows:
        raise SystemExit(f"recipe_search.py: no scored {args.dataset} milestone with a timing "
                         f"in {args.out}: run evaluate and time first")
    ws = [str(float(w)) for w in args.report_w]
    missing = sorted({w for r in rows for w in ws if w not in r["results"]})
    if missing:
        raise SystemExit(f"recipe_search.py: no results at w = {', '.join(missing)} in "
                         f"{args.out}/results.jsonl: evaluate with these --w, or report the "
                         "w it has")
    floor = rows[0]["floor"]
    print(f"real data (n = {rows[0]['n']}): FID {floor['fid']:.2f}, "
          f"accuracy {floor['accuracy']:.3f}\n")
    at = [f"{key} (w = {float(w):g})" for w in ws for key in ("FID", "accuracy")]
    print("| candidate | network | batch, lr | params | ms/step | steps | minutes | "
          + " | ".join(at) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(at))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    scored = {r["candidate"] for r in rows}
    for k, name in enumerate(c for c in candidates(args.dataset) if c in scored):
        mine = sorted((r for r in rows if r["candidate"] == name), key=lambda r: r["steps"])
        ms = timings[name]["ms_per_step"]
        c = mine[0]["config"]
        network = (f"{c['channels']} ch × {tuple(c['channel_mult'])}, "
                   f"{c['num_res_blocks']} block(s), dropout {c['dropout']}")
        for r in mine:
            scores = " | ".join(f"{r['results'][w]['fid']:.1f} | {r['results'][w]['accuracy']:.3f}"
                                for w in ws)
            print(f"| {name} | {network} | {r['flags'][1]}, {r['flags'][3]} | "
                  f"{r['params'] / 1e6:.2f}M | {ms:.0f} | {r['steps']} | "
                  f"{r['steps'] * ms / 60000:.1f} | {scores} |")
        minutes = [r["steps"] * ms / 60000 for r in mine]
        for ax, key in zip(axes, ("fid", "accuracy")):
            for style, w in zip(("o-", "s--", "^:", "v-."), ws):
                ax.plot(minutes, [r["results"][w][key] for r in mine], style, color=f"C{k}",
                        label=name if len(ws) == 1 else f"{name}, w = {float(w):g}")
    threads = next(iter(timings.values()))["threads"]
    for ax, key in zip(axes, ("fid", "accuracy")):
        ax.axhline(floor[key], ls="--", c="gray", label="real data")
        ax.set(xlabel=f"training minutes ({threads} threads, this machine)",
               ylabel=f"{key} at w = " + ", ".join(f"{float(w):g}" for w in ws),
               yscale="log" if key == "fid" else "linear")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)
    print(f"\nplot: {args.plot}")


def main():
    p = cli.parser("recipe_search.py", __doc__)
    p.add_argument("command", choices=["train", "evaluate", "time", "report"])
    p.add_argument("--dataset", default="mnist", choices=SEARCHED)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--candidates", nargs="+", choices=[*CANDIDATES, *CIFAR_CANDIDATES],
                   help="default: every candidate of the dataset's shape (cifar10: cifar-*)")
    p.add_argument("--minutes", type=float, nargs="+", default=[4, 8, 16, 24],
                   help="milestones, training minutes")
    p.add_argument("--train-steps", type=int, nargs="+",
                   help="milestones in steps instead of --minutes; an existing run of the "
                        "candidate is continued (train.py --resume), not restarted")
    p.add_argument("--n", type=int, default=1000,
                   help="samples per w at each milestone (balanced classes)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sampler", default=FAST_SAMPLER)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the sampler's)")
    p.add_argument("--classifier", default=None, help="a file or a shipped name; default: "
                       "out/classifier/<dataset>.pt, else the shipped metrics-<dataset>")
    p.add_argument("--out", default=os.path.join(REPO, "out", "recipes"))
    p.add_argument("--report-w", type=float, nargs="+", default=[0.0],
                   help="report: the w of the table and plot")
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "recipes.png"))
    args = p.parse_args()
    fitting = candidates(args.dataset)
    args.candidates = args.candidates or list(fitting)
    wrong = [c for c in args.candidates if c not in fitting]
    if wrong:
        p.error(f"not a {args.dataset} candidate: {', '.join(wrong)}; "
                f"choose from {', '.join(fitting)}")
    commands = dict(train=train_candidates, evaluate=evaluate_milestones, time=time_candidates,
                    report=report)
    commands[args.command](args)


if __name__ == "__main__":
    main()

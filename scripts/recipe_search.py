"""Time-to-quality search for the 28×28 presets: which network and training settings give the best
samples per minute of CPU training (README, "A recipe for CPU minutes").

Each candidate is a U-Net config (model.UNetConfig) and train.py flags. It is trained by train.py
itself, with model.PRESETS[dataset] replaced by the candidate's config in that process, in segments
that end at the given minutes (`--resume` continues each segment exactly, so the checkpoint at each
milestone is the one a single run of that many steps writes). At each milestone the EMA weights
draw --n samples (balanced classes, the same noise for every candidate and milestone) with the fast
sampler at w = 0 and w = 1, scored with the project's metrics classifier against held-out real
digits (metrics.load_splits); the real-data floor at the same count is printed beside them.

    python metrics.py train-classifier --dataset mnist --data-dir ../shared/data/mnist-4k
    OMP_NUM_THREADS=1 python scripts/recipe_search.py --data-dir ../shared/data/mnist-4k \
        --candidates baseline shallow --minutes 8 16 32 --out out/recipes

Writes out/recipes/<candidate>/ (checkpoint, milestones) and appends one JSON line per milestone to
out/recipes/results.jsonl. Minutes are wall-clock minutes of training alone on the machine that runs
it, with the threads it is given: report bench.py's matmul rate beside them.
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

import fast_cpu  # noqa: E402
import metrics  # noqa: E402
from model import UNetConfig, load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import sample  # noqa: E402

MNIST = dict(image_size=28, in_channels=1, num_classes=10)
CANDIDATES = {  # name -> (UNetConfig fields, train.py flags)
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
}

# train.main in a process whose model.PRESETS[dataset] is the candidate's config (argv[1], JSON).
TRAIN_WITH_CONFIG = """
import json, sys
sys.path.insert(0, {repo!r})
import model, train
config = json.loads(sys.argv[1])
model.PRESETS[{dataset!r}] = model.UNetConfig(**{{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}})
train.main(sys.argv[2:])
"""


def train_until(config, flags, dataset, data_dir, out, steps):
    """Train (or continue) the candidate's run in `out` to `steps` steps; returns the wall seconds it took."""
    resume = ["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else []
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", TRAIN_WITH_CONFIG.format(repo=REPO, dataset=dataset), json.dumps(config),
                          "--dataset", dataset, "--data-dir", data_dir, "--out-dir", out, "--max-steps", str(steps),
                          "--sample-every", "0", "--ckpt-every", "100000", *flags, *resume],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"recipe_search.py: training failed: {run.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def evaluate(ckpt_path, clf, ref_feats, n, ws, sampler, steps, seed=0):
    """MNIST FID / IS / accuracy of n samples (n/10 per class) per w, the same noise for every checkpoint."""
    model = model_from_checkpoint(load_checkpoint(ckpt_path), "ema").eval()
    labels = torch.arange(10).repeat_interleave(n // 10)
    results = {}
    for w in ws:
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(labels))]
        x = torch.cat([sample(model, labels[i:i + 250], w, steps, sampler, generator=generators[i:i + 250])
                       for i in range(0, len(labels), 250)])
        results[w] = metrics.mnist_metrics(clf, x, labels, ref_feats)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--minutes", type=float, nargs="+", default=[4, 8, 16, 24], help="milestones, training minutes")
    p.add_argument("--n", type=int, default=1000, help="samples per w at each milestone (balanced classes)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sampler", default="dpmpp2m")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    p.add_argument("--classifier", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--out", default=os.path.join(REPO, "out", "recipes"))
    args = p.parse_args()

    fast_cpu.keep_freed_memory()  # this process only samples (training runs in subprocesses), as sample.py
    clf = metrics.load_classifier(args.classifier or metrics.default_classifier_path(args.dataset))
    splits = metrics.load_splits(args.dataset, args.data_dir)
    (ref_x, _), (floor_x, floor_y) = metrics.reference_and_floor(*splits["held"])
    ref_feats = metrics.classifier_features(clf, ref_x)
    floor = metrics.real_floor(clf, floor_x, floor_y, ref_feats, args.n)
    print(f"real-data floor at n = {args.n}: FID {floor['fid']:.2f}, IS {floor['is']:.2f}, accuracy {floor['accuracy']:.3f}",
          flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name in args.candidates:
        fields, flags = CANDIDATES[name]
        config = dataclasses.asdict(UNetConfig(**MNIST, **fields))
        out = os.path.join(args.out, name)
        shutil.rmtree(out, ignore_errors=True)
        # Seconds per step: runs to 10 and on to 110 steps cost start-up + 10 and start-up + 100 steps.
        first = train_until(config, flags, args.dataset, args.data_dir, out, 10)
        step_s = (train_until(config, flags, args.dataset, args.data_dir, out, 110) - first) / 90
        if step_s <= 0:
            raise SystemExit(f"recipe_search.py: could not time {name}'s steps (start-up noise); run it again")
        shutil.rmtree(out)
        trained_s, done = 0.0, 0
        for minutes in args.minutes:
            steps = max(done + 1, int(minutes * 60 / step_s))
            trained_s += train_until(config, flags, args.dataset, args.data_dir, out, steps)
            done = steps
            milestone = os.path.join(out, f"ckpt_{steps:06d}.pt")
            shutil.copyfile(os.path.join(out, "ckpt.pt"), milestone)
            t = time.perf_counter()
            results = evaluate(milestone, clf, ref_feats, args.n, args.w, args.sampler, args.steps)
            row = dict(candidate=name, config=config, flags=flags, steps=steps, train_minutes=trained_s / 60,
                       params=sum(v.numel() for k, v in load_checkpoint(milestone)["ema"].items()),
                       n=args.n, sampler=args.sampler, floor=floor, threads=torch.get_num_threads(),
                       results={str(w): r for w, r in results.items()})
            with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:12s} {steps:6d} steps {trained_s / 60:6.1f} min  " + "  ".join(
                f"w={w:g}: FID {r['fid']:6.2f} acc {r['accuracy']:.3f}" for w, r in results.items())
                + f"  (eval {time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

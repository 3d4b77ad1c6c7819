"""Quality against sampling steps for the samplers of sample.py, on one trained checkpoint
(docs/results.md, "Fast sampling").

Every cell (sampler, λ spacing, steps T, w) draws the same --n images (n/10 per class;
image i's noise, the ancestral sampler's per-step noise included, comes from its own
generator seeded by (seed, i)) and scores them with the project's metrics classifier against
held-out real digits (metrics.load_splits): MNIST FID, IS and class accuracy, and the cell's
seconds. The real-data floor at the same count is printed and stored with the results.

    python scripts/sampler_study.py run --ckpt out/mnist/ckpt.pt --data-dir data/mnist-4k \\
        --cells ancestral:cosine:8,16,24,32,64,256 dpmpp2m:uniform:8,16,24,32,64 --w 0 3
    python scripts/sampler_study.py report  # the markdown table and docs/sampler_study.png

`run` appends one JSON line per cell to --results (default out/sampler_study/results.jsonl)
and skips cells already there, so it can be split across processes (one thread each) and
resumed.
"""
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import fast_cpu  # noqa: E402
import metrics  # noqa: E402
from model import load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import sample  # noqa: E402

RESULTS = os.path.join(REPO, "out", "sampler_study", "results.jsonl")


def parse_cells(items):
    """'sampler:spacing:T1,T2,...' -> [(sampler, spacing, T), ...]."""
    cells = []
    for item in items:
        sampler, spacing, steps = item.split(":")
        cells += [(sampler, spacing, int(t)) for t in steps.split(",")]
    return cells


def done_cells(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args):
    fast_cpu.keep_freed_memory()  # as sample.py's command line
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, "ema").eval()
    clf = metrics.load_classifier(metrics.classifier_path("mnist", args.classifier))
    splits = metrics.load_splits("mnist", args.data_dir, ckpt["args"].get("holdout"))
    (ref_x, _), (floor_x, floor_y) = metrics.reference_and_floor(*splits["held"])
    ref_feats = metrics.classifier_features(clf, ref_x)
    floor = metrics.real_floor(clf, floor_x, floor_y, ref_feats, args.n)
    print(f"real-data floor at n = {args.n}: FID {floor['fid']:.2f}, IS {floor['is']:.2f}, "
          f"accuracy {floor['accuracy']:.3f}", flush=True)
    labels = torch.arange(10).repeat_interleave(args.n // 10)
    seeds = [int(np.random.SeedSequence([args.seed, i]).generate_state(1)[0])
             for i in range(len(labels))]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    B = args.batch_size
    for sampler, spacing, steps in parse_cells(args.cells):
        for w in args.w:
            key = dict(ckpt=os.path.abspath(args.ckpt), sampler=sampler, spacing=spacing,
                       steps=steps, w=w, n=args.n)
            done = done_cells(args.results)
            if any(all(row.get(k) == v for k, v in key.items()) for row in done):
                continue
            start = time.perf_counter()
            x = torch.cat([sample(model, labels[i:i + B], w, steps, sampler, spacing,
                                  generator=[torch.Generator().manual_seed(s)
                                             for s in seeds[i:i + B]])
                           for i in range(0, len(labels), B)])
            seconds = time.perf_counter() - start
            result = metrics.classifier_metrics(clf, x, labels, ref_feats)
            row = dict(key, **result, seconds=seconds, threads=torch.get_num_threads(),
                       floor=floor, step=ckpt["step"])
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{sampler:9s} {spacing:7s} T={steps:3d} w={w:g}: "
                  f"FID {result['fid']:7.2f}  IS {result['is']:5.2f}  "
                  f"accuracy {result['accuracy']:.3f}  ({seconds:.0f} s)", flush=True)


def report(args):
    rows = done_cells(args.results)
    if not rows:
        raise SystemExit(f"sampler_study.py: no results in {args.results}: "
                         "run `sampler_study.py run` first")
    floor = rows[0]["floor"]
    ws = sorted({r["w"] for r in rows})
    print(f"real data (n = {rows[0]['n']}): FID {floor['fid']:.2f}, IS {floor['is']:.2f}, "
          f"accuracy {floor['accuracy']:.3f}\n")
    header = " | ".join(f"w = {w:g}: FID / IS / acc." for w in ws)
    print(f"| sampler | spacing | T | {header} | s per 1,000 (w = {max(ws):g}) |")
    print("|---|---|---|" + "---|" * len(ws) + "---|")
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["sampler"], r["spacing"], r["steps"]), {})[r["w"]] = r
    for (sampler, spacing, steps), cell in sorted(by_cell.items()):
        parts = [f"{cell[w]['fid']:.1f} / {cell[w]['is']:.2f} / {cell[w]['accuracy']:.3f}"
                 if w in cell else "—" for w in ws]
        last = cell.get(max(ws))
        seconds = f"{1000 * last['seconds'] / last['n']:.0f}" if last else "—"
        print(f"| {sampler} | {spacing} | {steps} | " + " | ".join(parts) + f" | {seconds} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 * len(ws), figsize=(4.2 * 2 * len(ws), 3.8))
    series = sorted({(s, sp) for s, sp, _ in by_cell})  # one colour per (sampler, spacing)
    for j, w in enumerate(ws):
        for metric, ax in (("fid", axes[2 * j]), ("accuracy", axes[2 * j + 1])):
            for k, (sampler, spacing) in enumerate(series):
                pts = sorted((t, c[w][metric]) for (s, sp, t), c in by_cell.items()
                             if (s, sp) == (sampler, spacing) and w in c)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=f"C{k}", label=f"{sampler}, {spacing}")
            ax.axhline(floor[metric], ls="--", c="gray", label="real data")
            ax.set(xscale="log", xlabel="sampling steps T", ylabel=f"MNIST {metric}",
                   title=f"w = {w:g}")
            ax.set_xticks([8, 16, 32, 64, 256], ["8", "16", "32", "64", "256"])
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles),
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    fig.savefig(args.plot, dpi=80)
    print(f"\nplot: {args.plot}")


def main():
    p = cli.parser("sampler_study.py", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--data-dir", required=True)
    r.add_argument("--cells", nargs="+", required=True, help="sampler:spacing:T1,T2,...")
    r.add_argument("--w", type=float, nargs="+", default=[0.0, 3.0])
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--classifier", default=None)
    r.add_argument("--results", default=RESULTS)
    q = sub.add_parser("report")
    q.add_argument("--results", default=RESULTS)
    q.add_argument("--plot", default=os.path.join(REPO, "docs", "sampler_study.png"))
    args = p.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()

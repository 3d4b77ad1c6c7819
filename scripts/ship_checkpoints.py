"""Export trained models into checkpoints/ (the shipped models) and write their manifest.

    python scripts/ship_checkpoints.py cifar10-cpu=out/cifar10-cpu/ckpt.pt \\
        metrics-cifar10=out/classifier/cifar10.pt noisy-classifier-mnist-4k=out/...

Each NAME=SOURCE writes checkpoints/NAME.pt with what loading and sampling read (config, EMA
weights, args, class names, step) and nothing else (no raw weights, optimizer or loss history).
The classifiers' weights are stored as float16 and read back as float32, which keeps the folder
under 30 MB; the U-Nets keep their float32 EMA weights exactly. checkpoints/manifest.json then
records for every file its SHA-256, bytes, kind, dataset, parameters, steps, seed, the command
that made it (rebuilt from the arguments the source stored) and what its training measured; a
metrics classifier's test accuracy is measured again on the shipped float16 file where its data
is at hand. checkpoints/README.md's table is written from the manifest; its prose is not touched.
"""
import functools
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import model as model_lib  # noqa: E402

OUT = model_lib.SHIPPED_DIR
UNET_KEYS = ("network", "config", "ema", "args", "step", "class_names", "bands", "band_accuracy")
TABLE_START, TABLE_END = "<!-- manifest table: scripts/ship_checkpoints.py -->", "<!-- end -->"
fail = functools.partial(cli.fail, prog="ship_checkpoints.py")


def half(state):
    """A state dict with its floating tensors in float16 (integer buffers unchanged)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def command(script, args, parse_args):
    """The command line that gives `args`: dataset, data dir and preset, then every setting that
    differs from what the script's `parse_args` chooses by itself for those three."""
    words = ["python", script, "--dataset", args["dataset"], "--data-dir", args["data_dir"]]
    if args.get("preset", data.DATASETS[args["dataset"]].preset) != data.DATASETS[
            args["dataset"]].preset:
        words += ["--preset", args["preset"]]
    defaults = vars(parse_args(words[2:]))
    skip = ("dataset", "data_dir", "preset", "out_dir", "json", "resume", "device")
    for key, value in args.items():
        if key in skip or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else ([f"--no-{flag[2:]}"] if value is False
                                               else [flag, str(value)])
    return " ".join(words)


def export(name, source):
    """(the shipped dict, its manifest entry without the file's hash) of one source file."""
    raw = torch.load(source, map_location="cpu", weights_only=True)
    args = raw["args"]
    if "arch" in raw:  # metrics.py train-classifier
        ckpt = dict(model=half(raw["model"]), arch=raw["arch"], config=raw["config"],
                    dataset=raw["dataset"], test_split=raw["test_split"], args=args)
        flags = [(k, args.get(k)) for k in ("epochs", "batch_size", "lr", "holdout")]
        flags += [("seed", args["seed"])] if args["seed"] else []
        made_by = " ".join(["python metrics.py train-classifier --dataset", args["dataset"],
                            "--data-dir", args["data_dir"]]
                           + [f"--{k.replace('_', '-')} {v}" for k, v in flags if v is not None])
        entry = dict(kind=f"metrics classifier ({raw['arch']})", weights="float16",
                     test_accuracy_float32=raw["test_accuracy"], test_split=raw["test_split"],
                     parameters=sum(v.numel() for v in raw["model"].values()
                                    if v.is_floating_point()))
        return ckpt, dict(entry, dataset=args["dataset"], data_dir=args["data_dir"],
                          seed=args["seed"], command=made_by)
    ckpt = {k: raw[k] for k in UNET_KEYS if k in raw}
    kind = model_lib.network_kind(raw)
    if kind == "classifier":  # noisy_classifier.py: p_φ of classifier guidance
        import noisy_classifier
        ckpt["ema"] = half(ckpt["ema"])
        made_by = command("noisy_classifier.py", args, noisy_classifier.parse_args)
        entry = dict(kind="noisy classifier p_φ(c | z_λ)", weights="float16",
                     band_accuracy=raw.get("band_accuracy"), bands=raw.get("bands"))
    else:
        import train
        made_by = command("train.py", args, train.parse_args)
        losses = raw.get("losses")
        entry = dict(kind="guidance-free U-Net" if args.get("guidance_free") else "U-Net",
                     weights="float32 (EMA)", p_uncond=args["p_uncond"], preset=args["preset"],
                     final_loss=round(losses[-100:].mean().item(), 4) if losses is not None
                     else None)
    entry.update(dataset=args["dataset"], data_dir=args["data_dir"], steps=raw["step"],
                 seed=args["seed"], command=made_by,
                 parameters=sum(v.numel() for v in raw["ema"].values()))
    return ckpt, entry


def measure_accuracy(path, entry):
    """The shipped metrics classifier's accuracy on its test split, or None without the data."""
    args = entry["data_dir"]
    try:
        splits = metrics.load_splits(entry["dataset"], args)
    except Exception as e:  # data absent here: keep the float32 figure only
        print(f"  {entry['dataset']}: no data at {args} ({type(e).__name__}); accuracy not "
              "measured again", file=sys.stderr)
        return None
    clf = metrics.load_classifier(path, dataset=entry["dataset"])
    return round(metrics.accuracy(clf, *splits["held"]), 4)


def table(manifest):
    rows = ["| file | kind | dataset | parameters | steps | MB | SHA-256 |",
            "|---|---|---|---|---|---|---|"]
    for name, e in sorted(manifest.items()):
        rows.append(f"| `{name}.pt` | {e['kind']} | {e['dataset']} | {e['parameters']:,} | "
                    f"{e.get('steps', '')} | {e['bytes'] / 1e6:.2f} | `{e['sha256']}` |")
    rows += ["", "The command that made each file (run from the repository's root):", ""]
    rows += [f"- `{name}.pt`: `{e['command']}`" for name, e in sorted(manifest.items())]
    return "\n".join(rows)


def main(argv=None):
    p = cli.parser("ship_checkpoints.py", __doc__)
    p.add_argument("pairs", nargs="+", metavar="NAME=SOURCE")
    args = p.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    manifest_path = os.path.join(OUT, "manifest.json")
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    for pair in args.pairs:
        name, _, source = pair.partition("=")
        if not name or not source or not os.path.isfile(source):
            fail(f"{pair!r}: give NAME=SOURCE with SOURCE an existing checkpoint")
        ckpt, entry = export(name, source)
        path = os.path.join(OUT, f"{name}.pt")
        model_lib.save_checkpoint(ckpt, path)
        if entry["kind"].startswith("metrics"):
            entry["test_accuracy"] = measure_accuracy(path, entry)
        entry.update(sha256=cli.sha256(path), bytes=os.path.getsize(path))
        manifest[name] = entry
        print(f"{path}: {entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256']}")
    cli.write_json(manifest_path, manifest)
    readme = os.path.join(OUT, "README.md")
    with open(readme) as f:
        text = f.read()
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        fail(f"{readme} has no {TABLE_START} ... {TABLE_END} markers to write the table between")
    cli.atomic_write(readme, lambda f: f.write(
        f"{head}{TABLE_START}\n{table(manifest)}\n{TABLE_END}{tail}"), mode="w")
    total = sum(e["bytes"] for e in manifest.values())
    print(f"{len(manifest)} files, {total / 1e6:.2f} MB in all; {manifest_path}, {readme}")


if __name__ == "__main__":
    main()

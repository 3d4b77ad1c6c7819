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
import re
import shlex
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


def flags(key, value):
    """The command-line words that set `key` to `value` (None: none)."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    return [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]


def command(script, args, parse_args, step):
    """The command line that gives `args` and stops at `step`: dataset, data dir and preset, then
    every setting that differs from what the script's `parse_args` chooses by itself for those."""
    words = ["--dataset", args["dataset"], "--data-dir", args["data_dir"]]
    own = getattr(data.DATASETS.get(args["dataset"]), "preset", None)
    words += flags("preset", args["preset"]) if args.get("preset", own) != own else []
    defaults = vars(parse_args(words))
    skip = ("dataset", "data_dir", "preset", "out_dir", "json", "resume", "device")
    for key, value in args.items():
        if key not in skip and value != defaults.get(key):
            words += flags(key, step if key == "max_steps" else value)
    if args.get("max_steps") == defaults.get("max_steps") != step:  # an unfinished run
        words += flags("max_steps", step)
    return shlex.join(["python", script, *words])


def export(name, source):
    """(the shipped dict, its manifest entry without the file's hash) of one source file."""
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
        args = raw["args"]
    except Exception as e:  # not a checkpoint, pickled code, or one without its arguments
        fail(f"{source} is not a checkpoint of train.py, noisy_classifier.py or metrics.py "
             f"train-classifier with its arguments ({type(e).__name__})")
    if "arch" in raw:  # metrics.py train-classifier
        ckpt = dict(model=half(raw["model"]), arch=raw["arch"], config=raw["config"],
                    dataset=raw["dataset"], test_split=raw["test_split"], args=args)
        words = ["--dataset", args["dataset"], "--data-dir", args["data_dir"]]
        for key in ("epochs", "batch_size", "lr", "holdout"):
            words += flags(key, args.get(key))
        words += flags("seed", args["seed"]) if args["seed"] else []
        made_by = shlex.join(["python", "metrics.py", "train-classifier", *words])
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
        made_by = command("noisy_classifier.py", args, noisy_classifier.parse_args, raw["step"])
        entry = dict(kind="noisy classifier p_φ(c | z_λ)", weights="float16",
                     band_accuracy=raw.get("band_accuracy"), bands=raw.get("bands"))
    else:
        import train
        made_by = command("train.py", args, train.parse_args, raw["step"])
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
    data_dir = entry["data_dir"]
    try:
        splits = metrics.load_splits(entry["dataset"], data_dir)
    except Exception as e:  # data absent here: keep the float32 figure only
        print(f"  {entry['dataset']}: no data at {data_dir} ({type(e).__name__}); accuracy not "
              "measured again", file=sys.stderr)
        return None
    clf = metrics.load_classifier(path, dataset=entry["dataset"])
    return round(metrics.accuracy(clf, *splits["held"]), 4)


def measured(e):
    """What training measured, in words: the final loss, a test accuracy, p_φ's by noise band."""
    if e.get("test_accuracy") is not None:
        return f"test accuracy {e['test_accuracy']:.4f} ({e['test_split']})"
    if e.get("band_accuracy"):
        return "accuracy by λ band: " + ", ".join(
            f"[{lo:g}, {hi:g}] {a:.3f}" for (lo, hi), a in zip(e["bands"], e["band_accuracy"]))
    return f"loss {e['final_loss']:.4f} (mean of the last 100 steps)" if e.get("final_loss") else ""


def table(manifest):
    rows = ["| file | kind | dataset | parameters | steps | seed | MB | training measured "
            "| SHA-256 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(manifest.items()):
        kind, what = (text.replace("|", "\\|") for text in (e["kind"], measured(e)))
        rows.append(f"| `{name}.pt` | {kind} | {e['dataset']} | {e['parameters']:,} | "
                    f"{e.get('steps', '')} | {e['seed']} | {e['bytes'] / 1e6:.2f} | {what} "
                    f"| `{e['sha256']}` |")
    rows += ["", "The command that made each file (run from the repository's root):", ""]
    rows += [f"- `{name}.pt`: `{e['command']}`" for name, e in sorted(manifest.items())]
    return "\n".join(rows)


def main(argv=None):
    p = cli.parser("ship_checkpoints.py", __doc__)
    p.add_argument("pairs", nargs="+", metavar="NAME=SOURCE")
    args = p.parse_args(argv)
    pairs = [pair.partition("=")[::2] for pair in args.pairs]
    for pair, (name, source) in zip(args.pairs, pairs):
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or not os.path.isfile(source):
            fail(f"{pair!r}: give NAME=SOURCE, NAME in lower-case letters, digits and '-', "
                 "SOURCE an existing checkpoint")
    readme, manifest_path = os.path.join(OUT, "README.md"), os.path.join(OUT, "manifest.json")
    text = open(readme).read() if os.path.isfile(readme) else ""
    if TABLE_START not in text or TABLE_END not in text.partition(TABLE_START)[2]:
        fail(f"{readme} needs the lines {TABLE_START} and {TABLE_END}, to write the table between")
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    for name, source in pairs:
        ckpt, entry = export(name, source)
        path = os.path.join(OUT, f"{name}.pt")
        model_lib.save_checkpoint(ckpt, path)
        if entry["kind"].startswith("metrics"):
            entry["test_accuracy"] = measure_accuracy(path, entry)
        entry.update(sha256=cli.sha256(path), bytes=os.path.getsize(path))
        manifest[name] = entry
        print(f"{path}: {entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256']}")
    cli.write_json(manifest_path, manifest)
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    cli.atomic_write(readme, lambda f: f.write(
        f"{head}{TABLE_START}\n{table(manifest)}\n{TABLE_END}{tail}"), mode="w")
    total = sum(e["bytes"] for e in manifest.values())
    print(f"{len(manifest)} files, {total / 1e6:.2f} MB in all; {manifest_path}, {readme}")


if __name__ == "__main__":
    main()

"""The studies behind notebooks 02 to 07: sample.py runs, cached as npz files, scored by metrics.py.

A study is a set of named cells; a cell is one `sample.py` command line (checkpoint, sampler,
guidance rule, w values). Its images go to <out>/<name>.npz, with the command, wall seconds and
threads in <name>.json. The cache is reused while the command (compared as written, paths
included) and the files it reads (checkpoints, by SHA-256) are unchanged, so a notebook
re-executes without re-sampling and a retrained checkpoint is sampled again. The cells can be
drawn beforehand in parallel processes, one thread each, from notebooks/ with its paths:

    cd notebooks
    OMP_NUM_THREADS=1 python ../scripts/study.py 03 --ckpt cifar10-cpu \\
        --out ../out/studies/03-cifar10 --part 0/2 &
    OMP_NUM_THREADS=1 python ../scripts/study.py 03 --ckpt cifar10-cpu \\
        --out ../out/studies/03-cifar10 --part 1/2

Every cell uses sample.py's noise: image (class c, index j) of noise set s (--seed s, default
0) starts from the noise of seed (s, c, j) whatever the w or rule, so settings are compared
on the same noise. `Scorer` scores images with the project's metrics classifier against
held-out real images (metrics.load_splits) and gives the real-data floor at the same count.
"""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import metrics  # noqa: E402
from model import checkpoint_path  # noqa: E402
from sample import FAST_SAMPLER  # noqa: E402

OUT = os.path.join(REPO, "out", "studies")
MANIFEST = os.path.join(REPO, "checkpoints", "manifest.json")  # the shipped files' SHA-256
QUICK = os.environ.get("CFG_QUICK") == "1"  # CI: a few images and steps, to exercise the code


def load_cell(npz):
    """(images, labels, w) of a cell; w in float64 rounded to 6 decimals (the npz keeps
    float32), so that `ws == 0.1` selects the images of w = 0.1."""
    images, labels, ws = metrics.load_samples_npz(npz)
    return images, labels, torch.round(ws.double() * 1e6) / 1e6


def input_files(argv):
    """{argument: SHA-256} of the arguments of a command that are files, or shipped models named
    by --ckpt / --guide-ckpt (its checkpoints)."""
    files = {a: checkpoint_path(a) if flag in ("--ckpt", "--guide-ckpt") else a
             for flag, a in zip([None, *argv], argv)}
    return {a: cli.sha256(path) for a, path in files.items() if os.path.isfile(path)}


def run_cell(name, argv, out_dir=OUT):
    """The images of `python sample.py *argv`: (images uint8 (N, C, H, W), labels (N,),
    w (N,) float64), from <out_dir>/<name>.npz when the same command wrote it from the same
    files, else sampled now (and cached)."""
    os.makedirs(out_dir, exist_ok=True)
    npz = os.path.join(out_dir, f"{name}.npz")
    info_path = os.path.join(out_dir, f"{name}.json")
    argv = [str(a) for a in argv]
    inputs = input_files(argv)
    if os.path.exists(info_path) and os.path.exists(npz):
        with open(info_path) as f:
            info = json.load(f)
        if info["argv"] == argv and info.get("inputs") == inputs:
            return load_cell(npz)
    start = time.perf_counter()
    png = os.path.join(out_dir, f"{name}.png")
    cmd = [sys.executable, os.path.join(REPO, "sample.py"), *argv, "--npz", npz, "--out", png]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"sample.py {' '.join(argv)} failed: {run.stderr.strip()}")
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
    info = dict(argv=argv, inputs=inputs, seconds=time.perf_counter() - start, threads=threads)
    cli.write_json(info_path, info)
    return load_cell(npz)


def cell_seconds(name, out_dir=OUT):
    """Wall seconds and threads of a cell's sampling run, as recorded when it was drawn."""
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        info = json.load(f)
    return info["seconds"], info["threads"]


def provenance(name, out_dir=OUT):
    """A line on a cached cell: its wall time and threads, and for each checkpoint it read,
    whether the SHA-256 recorded when it was drawn is that of the shipped file of the name it
    was read by (for a path: the start of its SHA-256)."""
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        info = json.load(f)
    with open(MANIFEST) as f:
        shipped = json.load(f)
    parts = []
    for arg, digest in info["inputs"].items():
        if arg in shipped:
            same = shipped[arg]["sha256"] == digest
            parts.append(f"{arg}: {'the shipped file' if same else 'NOT the shipped file'}")
        else:
            parts.append(f"{arg}: sha256 {digest[:12]}…")
    return f"{name}: {info['seconds']:.0f} s at {info['threads']} thread(s); " + "; ".join(parts)


class Scorer:
    """FID / IS / class accuracy by the project's metrics classifier, against held-out reals."""

    def __init__(self, dataset, data_dir, classifier=None, holdout=None):
        path = metrics.classifier_path(dataset, classifier)
        self.clf = metrics.load_classifier(path)
        self.splits = metrics.load_splits(dataset, data_dir, holdout)
        (ref_x, _), self.floor_pool = metrics.reference_and_floor(*self.splits["held"])
        self.ref_feats = metrics.classifier_features(self.clf, ref_x)

    def floor(self, n):
        """What n other held-out real images score: the best a sampler can do at this count."""
        return metrics.real_floor(self.clf, *self.floor_pool, self.ref_feats, n)

    def score(self, images, labels):
        return metrics.classifier_metrics(self.clf, images, labels, self.ref_feats)

    def score_per_w(self, images, labels, ws):
        """{w: metrics} for each distinct w of a cell."""
        return {w: self.score(images[ws == w], labels[ws == w])
                for w in torch.unique(ws).tolist()}


def _crossing(a, b, accuracy):
    """The point between a and b (metrics dicts) at `accuracy`, log FID linear in accuracy;
    the NFE of the end that reaches it."""
    t = (accuracy - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
    fid = math.exp((1 - t) * math.log(a["fid"]) + t * math.log(b["fid"]))
    return fid, (b if b["accuracy"] >= accuracy else a).get("nfe")


def fid_at_accuracy(points, accuracy):
    """(FID, NFE/step) where a curve first reaches a class accuracy, or None if it never does.

    points: the curve's metrics dicts ("fid", "accuracy", "nfe") in order of strength.
    Between the two points that bracket `accuracy`, log FID is linear in accuracy and the NFE
    is the upper point's; a curve whose first point already reaches it gives that point."""
    seq = list(points)
    if seq and seq[0]["accuracy"] >= accuracy:
        return seq[0]["fid"], seq[0].get("nfe")
    for a, b in zip(seq, seq[1:]):
        if a["accuracy"] < accuracy <= b["accuracy"]:
            return _crossing(a, b, accuracy)
    return None


def lowest_fid_at_accuracy(points, accuracy):
    """(FID, NFE/step): the lowest FID a curve gives at a class accuracy of at least
    `accuracy` (its points that reach it, and its crossings interpolated as fid_at_accuracy
    does), or None. Equal to fid_at_accuracy on a curve whose FID rises with accuracy; lower
    on one that starts above the accuracy and falls back towards it (a user who wants that
    accuracy picks the best strength)."""
    seq = list(points)
    found = [(p["fid"], p["nfe"]) for p in seq if p["accuracy"] >= accuracy]
    for a, b in zip(seq, seq[1:]):
        low, high = sorted((a["accuracy"], b["accuracy"]))
        if low < accuracy <= high:
            found.append(_crossing(a, b, accuracy))
    return min(found, default=None)


def curve_at(points, accuracy):
    """(FID, where) of a curve at a class accuracy: "on" it (interpolated as fid_at_accuracy
    does), or "below" / "above" the accuracies its points span (then its nearest end's FID).

    points: the curve's metrics dicts ("fid", "accuracy") in order of strength."""
    seq = list(points)
    if accuracy < seq[0]["accuracy"]:
        return seq[0]["fid"], "below"
    if accuracy > seq[-1]["accuracy"]:
        return seq[-1]["fid"], "above"
    return fid_at_accuracy(seq, accuracy)[0], "on"


def mean_sd(values, digits=2):
    """"mean ± std" over noise sets (the std with ddof 1: the spread of one set's value)."""
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def verdict(diffs):
    """A paired difference over noise sets, and whether it exceeds its noise: it does when it
    has the same sign on every set and its mean is larger than its std."""
    m, sd = np.mean(diffs), np.std(diffs, ddof=1)
    clear = all(np.sign(diffs) == np.sign(m)) and abs(m) > sd
    side = "lower" if m < 0 else "higher"
    return f"{m:+8.2f} ± {sd:6.2f}: " + (f"{side} on every set" if clear else "within the spread")


def common(ckpt, n_per_class, steps=None, sampler=FAST_SAMPLER):
    """The sample.py arguments every cell of a study shares."""
    return ["--ckpt", ckpt, "--n-per-class", n_per_class, "--sampler", sampler,
            "--batch-size", 250, *(["--steps", steps] if steps else [])]


W_04 = (0, 0.5, 1, 2, 4, 6)  # notebook 04: every rule over these w
W_04_MID = (0.2,)  # and CFG between w = 0 and 0.5, where its accuracy climbs from 0.95 to 0.99
SEEDS_04 = (0, 1, 2)  # three noise sets, each paired across the three rules


def noise_sets(name, ckpt, n_per_class, ws, rule=(), steps=None, seeds=SEEDS_04):
    """One cell per noise set: <name>-s<seed>, `ckpt` under `rule` over `ws`, image (c, j)
    from the noise of seed (seed, c, j)."""
    return {f"{name}-s{seed}": [*common(ckpt, n_per_class, steps), "--seed", seed, *rule,
                                "--w", *ws] for seed in seeds}


def algorithm2(ckpt, n_per_class, w, seed=SEEDS_04[0]):
    """{name: argv}: one cell of Algorithm 2 as the paper runs it (the ancestral sampler at
    T = 256, v = 0.3) at one w on noise set `seed` (ten times the fast sampler's cost: one
    cell per w, so that parallel processes share them)."""
    steps = 4 if QUICK else 256
    return {f"ancestral256-w{w}-s{seed}": [*common(ckpt, n_per_class, steps, "ancestral"),
                                           "--seed", seed, "--w", w]}


W_REVERSE = (-1, -2, -3)  # notebook 02: reverse guidance, w = -1 is the unconditional model
W_HIGH_02 = (2, 4, 6)  # Fashion-MNIST's CFG past W_FASHION, to notebook 04's largest w
W_ABLATION = (0, 0.2, 0.5, 1, 2, 4)  # the p_uncond ablation: accuracy from unguided to 1


def plan_02(ckpt, n_per_class, steps=None, high=(), ablation=(), check=True, seeds=SEEDS_04):
    """notebook 02's own cells on each noise set of `seeds` (its CFG curves are notebook 04's
    cfg cells on mnist-4k and 06-sets' fashion-cfg cells, the same noise): reverse guidance
    over W_REVERSE; CFG at the w of `high`; for each (p_uncond, checkpoint) of `ablation`, CFG
    over W_ABLATION; with `check`, w = 0 by Algorithm 2 on the first set."""
    cells = noise_sets("reverse", ckpt, n_per_class, W_REVERSE, steps=steps, seeds=seeds)
    if high:
        cells.update(noise_sets("cfg-high", ckpt, n_per_class, high, steps=steps, seeds=seeds))
    for p, path in ablation:
        cells.update(noise_sets(f"p{p}", path, n_per_class, W_ABLATION, steps=steps, seeds=seeds))
    return {**cells, **(algorithm2(ckpt, n_per_class, 0, seeds[0]) if check else {})}


W_03 = (0, 0.3, 1, 2)  # notebook 03: CFG below W_CHECK_03 (03-check's cells), so w = 0 … 6
W_REVERSE_03 = (-1, -2)


def plan_03(ckpt, n_per_class, steps=None, check=True, seeds=SEEDS_04):
    """notebook 03 (JPEG CIFAR-10): CFG over W_03 on each noise set of `seeds` (above it, the
    03-check cells: the same noise), reverse guidance over W_REVERSE_03 on the first set,
    and with `check`, w = 0 by Algorithm 2 on the first set."""
    cells = noise_sets("cfg", ckpt, n_per_class, W_03, steps=steps, seeds=seeds)
    cells.update(noise_sets("reverse", ckpt, n_per_class, W_REVERSE_03, steps=steps,
                            seeds=seeds[:1]))
    return {**cells, **(algorithm2(ckpt, n_per_class, 0, seeds[0]) if check else {})}


def plan_04(ckpt, classifier_ckpt, n_per_class, steps=None, seeds=SEEDS_04):
    """notebook 04: CFG and classifier guidance on both of its bases over W_04, on each noise
    set of `seeds` (image (c, j) of seed s starts from the noise of seed (s, c, j) in every
    cell of that s). Classifier guidance on the conditional base at w = 0 is the conditional
    model itself, CFG's w = 0, so that cell starts at the next w. CFG's cell cfg-mid-s<seed>
    adds W_04_MID, for reading CFG's FID at the accuracies of the other curves."""
    guide = ("--guidance", "classifier", "--guide-ckpt", classifier_ckpt)
    return {**noise_sets("cfg", ckpt, n_per_class, W_04, (), steps, seeds),
            **noise_sets("classifier-uncond", ckpt, n_per_class, W_04, guide, steps, seeds),
            **noise_sets("classifier-cond", ckpt, n_per_class, W_04[1:],
                         (*guide, "-p", "base=cond"), steps, seeds),
            **noise_sets("cfg-mid", ckpt, n_per_class, W_04_MID, (), steps, seeds)}


W_FASHION = (0, 0.1, 0.2, 0.3, 0.5, 1)  # Fashion-MNIST: the small w of the paper's minimum
GFT = ("--guidance", "guidance-free")  # one evaluation per step (train.py --guidance-free)


W_CHECK_03 = (3, 4, 6)  # notebook 03: around JPEG CIFAR-10's lowest FID (w = 4 on one noise set)


def plan_03_check(ckpt, n_per_class, seeds=SEEDS_04, steps=None):
    """notebook 03: CIFAR-10's minimum over w checked: the fast sampler at W_CHECK_03 on three
    noise sets, and Algorithm 2 at each w of W_CHECK_03 on the first set."""
    cells = {}
    for w in W_CHECK_03:
        cells.update(algorithm2(ckpt, n_per_class, w, seeds[0]))
    return {**cells, **noise_sets("fast", ckpt, n_per_class, W_CHECK_03, steps=steps, seeds=seeds)}


def plan_06_sets(n_per_class, steps=None):
    """notebook 06: the shipped guidance-free models against the shipped CFG ones on three
    noise sets: mnist-4k-gft over W_04 and W_04_MID (CFG's cells are notebook 04's cfg-s<seed>
    and cfg-mid-s<seed>, the same noise), and Fashion-MNIST's CFG and guidance-free models over
    W_FASHION."""
    w_mnist = sorted(W_04 + W_04_MID)
    return {**noise_sets("mnist-gft", "mnist-4k-gft", n_per_class, w_mnist, GFT, steps),
            **noise_sets("fashion-cfg", "fashion-mnist", n_per_class, W_FASHION, (), steps),
            **noise_sets("fashion-gft", "fashion-mnist-gft", n_per_class, W_FASHION, GFT,
                         steps)}


# notebook 05: the guidance interval's map over (λ_lo, λ_hi) at one w
# (edges between the fast sampler's λ steps); quick (CI): 3 cells
MAP_W = 2
MAP_LO, MAP_HI = ((-20, -4), (0, 20)) if QUICK else ((-20, -8, -4, 0), (-4, 0, 4, 8, 20))

def interval_rule(lo, hi):
    """sample.py's arguments for CFG in the λ interval [lo, hi]."""
    return ["--guidance", "interval", "-p", f"logsnr_lo={lo}", f"logsnr_hi={hi}"]


def autoguidance_rule(path):
    """sample.py's arguments for autoguidance with the bad model at `path`."""
    return ["--guidance", "autoguidance", "--guide-ckpt", path]


def auto_w(name):
    """Autoguidance's w for a bad model: the worst (name "602", the step-602 checkpoint) only
    w = 0.5 and 1, the others 0.5 … 3."""
    return [0.5, 1] if name == "602" else [0.5, 1, 2, 3]


RULES_05 = {  # notebook 05: the nonlinear rules' sample.py arguments and their w
    "rescale": (["--guidance", "rescale"], [1, 2, 4]),
    "apg": (["--guidance", "apg"], [1, 2, 4]),  # the paper's defaults
    "apg-projection": (["--guidance", "apg", "-p", "r=inf", "beta=0"], [1, 2, 4]),  # alone
    "dthresh": (["--clip", 0.995], [1, 2, 4]),
}


STEPS_05 = (10, 24, 50, 256)  # notebook 05: CFG++ against CFG on the DDIM step at these T
SEEDS_05 = (0, 1, 2)  # three noise sets, each paired across both rules and every T
W_STEPS_05 = {"cfg": (0, 0.5, 1), "cfgpp": (-0.8, -0.4)}  # CFG's w; CFG++'s γ = 1 + w: 0.2, 0.6
W_STEPS_05_256 = {"cfg": (0, 1), "cfgpp": (-0.8,)}  # at T = 256 (ten times the cost): fewer
CFGPP_MIDDLE_05 = -0.6  # γ = 0.4, in a cell of its own at each T but 256


def plan_05_steps(ckpt, n_per_class, steps=STEPS_05):
    """notebook 05: CFG++ against CFG on the DDIM step at each T of `steps`, three noise sets
    each. Seed s: image (c, j) starts from the noise of seed (s, c, j) in every cell of that s.
    Cells are named ddim<T>-<rule>-s<seed>, and ddim<T>-cfgpp-g0.4-s<seed> for CFG++'s
    CFGPP_MIDDLE_05; at T = 256 each rule runs at fewer strengths."""
    cells = {}
    for T in steps:
        ws = W_STEPS_05_256 if T == 256 else W_STEPS_05
        for seed in SEEDS_05:
            base = [*common(ckpt, n_per_class, T, "ddim"), "--seed", seed]
            cfgpp = [*base, "--guidance", "cfgpp", "--w"]
            cells[f"ddim{T}-cfg-s{seed}"] = [*base, "--w", *ws["cfg"]]
            cells[f"ddim{T}-cfgpp-s{seed}"] = [*cfgpp, *ws["cfgpp"]]
            if T != 256:
                cells[f"ddim{T}-cfgpp-g0.4-s{seed}"] = [*cfgpp, CFGPP_MIDDLE_05]
    return cells


INTERVAL_05 = (-4, 0)  # notebook 05's chosen guidance interval (λ_lo, λ_hi)
W_INTERVAL_05 = (0.5, 1, 2, 3, 4)


def plan_05_sets(ckpt, guide_ckpts, n_per_class, steps=None, interval=INTERVAL_05,
                 seeds=SEEDS_05):
    """notebook 05: the later rules with the fast sampler on each noise set of `seeds` (CFG's
    curve is notebook 04's cfg cells, on the same noise): the interval map at w = MAP_W on the
    first set (its whole range is CFG itself), the chosen `interval` over W_INTERVAL_05,
    autoguidance with each bad model of `guide_ckpts` ({name: path}) and the rules of
    RULES_05, each on every set."""
    first = seeds[:1]
    cells = {}
    for lo in MAP_LO:
        for hi in [hi for hi in MAP_HI if lo < hi and (lo, hi) != (MAP_LO[0], MAP_HI[-1])]:
            cells.update(noise_sets(f"interval{lo:+d}{hi:+d}", ckpt, n_per_class, [MAP_W],
                                    interval_rule(lo, hi), steps, first))
    cells.update(noise_sets("interval", ckpt, n_per_class, W_INTERVAL_05,
                            interval_rule(*interval), steps, seeds))
    for name, path in guide_ckpts.items():
        cells.update(noise_sets(f"auto-{name}", ckpt, n_per_class, auto_w(name),
                                autoguidance_rule(path), steps, seeds))
    for name, (rule, ws) in RULES_05.items():
        cells.update(noise_sets(name, ckpt, n_per_class, ws, rule, steps, seeds))
    return cells


W_07 = [0, 0.2, 0.5, 1]  # notebook 07: mnist-4k's accuracy climbs from 0.94 to 1.00 by w = 1
SEEDS_07 = (0, 1, 2)  # three noise sets, each paired across every rule and model


def plan_07(cfg_ckpt, p0_ckpt, n_per_class, steps=None):
    """notebook 07: guidance without the null label on mnist-4k, three noise sets each:
    ICG on a network trained with p_uncond = 0 (`p0_ckpt`) against CFG on the paper's network
    (`cfg_ckpt`, p_uncond = 0.1, the same steps) over W_07, and CFG-Zero* and the linear
    strength schedule on the paper's network at its guided w. Seed s: image (c, j) starts from
    the noise of seed (s, c, j), the same for every cell of that s."""
    return {**noise_sets("cfg", cfg_ckpt, n_per_class, W_07, (), steps, SEEDS_07),
            **noise_sets("icg", p0_ckpt, n_per_class, W_07, ("--guidance", "icg"), steps, SEEDS_07),
            **noise_sets("cfg-zero", cfg_ckpt, n_per_class, W_07[1:], ("--guidance", "cfg-zero"),
                         steps, SEEDS_07),
            **noise_sets("schedule", cfg_ckpt, n_per_class, W_07[1:], ("--guidance", "schedule"),
                         steps, SEEDS_07)}


def number(text):
    """A number as the notebooks write it (-4, not -4.0): a cell's command is its cache key."""
    value = float(text)
    return int(value) if value.is_integer() else value


def main():
    p = cli.parser("study.py", __doc__)
    p.add_argument("study", choices=["02", "03", "03-check", "04", "05-sets", "05-steps",
                                     "06-sets", "07"])
    p.add_argument("--ckpt", help="the diffusion model (every study but 06-sets, which "
                   "reads the shipped models; shipped names work, e.g. cifar10-cpu)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--ablation", nargs="*", default=[], metavar="P=CKPT",
                   help="02: p_uncond ablation checkpoints")
    p.add_argument("--high", type=number, nargs="*", default=[], metavar="W",
                   help="02: CFG at these w too (Fashion-MNIST: 2 4 6)")
    p.add_argument("--classifier-ckpt",
                   help="04: the noise-conditional classifier (noisy_classifier.py)")
    p.add_argument("--guide-ckpt", nargs="*", default=[], metavar="NAME=CKPT",
                   help="05-sets: autoguidance's bad models")
    p.add_argument("--p0-ckpt", help="07: a model trained with --p-uncond 0; --ckpt: the "
                   "paper's (p_uncond = 0.1)")
    p.add_argument("--interval", type=number, nargs=2, metavar=("LO", "HI"),
                   help="05-sets: the interval for its w sweep (default -4 0)")
    p.add_argument("--no-check", action="store_true",
                   help="02, 03: without the T = 256 ancestral cell")
    p.add_argument("--cells", nargs="*", help="only these cells (names)")
    p.add_argument("--out", required=True,
                   help="the notebook's cell folder, e.g. out/studies/02-mnist")
    p.add_argument("--part", default="0/1",
                   help="i/n: draw every n-th cell from the i-th (parallel processes)")
    args = p.parse_args()
    i, n = map(int, args.part.split("/"))
    ablation = [tuple(item.split("=", 1)) for item in args.ablation]
    if args.ckpt is None and args.study != "06-sets":
        p.error(f"study {args.study} needs --ckpt, the diffusion model")
    if args.study == "02":
        cells = plan_02(args.ckpt, args.n_per_class, high=args.high, ablation=ablation,
                        check=not args.no_check)
    elif args.study == "03":
        cells = plan_03(args.ckpt, args.n_per_class, check=not args.no_check)
    elif args.study == "04":
        cells = plan_04(args.ckpt, args.classifier_ckpt, args.n_per_class)
    elif args.study == "03-check":
        cells = plan_03_check(args.ckpt, args.n_per_class)
    elif args.study == "06-sets":
        cells = plan_06_sets(args.n_per_class)
    elif args.study == "05-steps":
        cells = plan_05_steps(args.ckpt, args.n_per_class)
    elif args.study == "07":
        if not args.p0_ckpt:
            p.error("study 07 needs --p0-ckpt, a model trained with --p-uncond 0")
        cells = plan_07(args.ckpt, args.p0_ckpt, args.n_per_class)
    else:
        guides = dict(item.split("=", 1) for item in args.guide_ckpt)
        cells = plan_05_sets(args.ckpt, guides, args.n_per_class,
                             interval=args.interval or INTERVAL_05)
    for name in [c for c in cells if args.cells is None or c in args.cells][i::n]:
        start = time.perf_counter()
        run_cell(name, cells[name], args.out)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Guided sampling: Algorithm 2's loop, its steps, and the command line.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Algorithm 2, for
λ_1 = λ_min < … < λ_T = λ_max and w (0: the conditional model; −1: the unconditional):

    1: z_1 ~ N(0, I)
    2: for t = 1, …, T:
    3:     ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)
    4:     x̃_t = (z_t − σ_λt ε̃_t) / α_λt
    5:     z_{t+1} ~ N(μ̃_{λt+1|λt}(z_t, x̃_t), (σ̃²_{λt+1|λt})^{1−v} (σ²_{λt|λt+1})^v)  if t < T,
           else z_{t+1} = x̃_t
    7: return z_{T+1}

`sample` is the loop, written once with no branch on a name: line 3's rule is one of
guidance.RULES, line 5's step ("could be replaced by another sampler, e.g. DDIM") one of
SAMPLERS; λ_t sit at evenly spaced u of the "cosine" schedule (the paper's) or a "uniform" one.
Deviation from the paper: x̃ is clipped to [−1, 1] by default, as in DDPM and ADM (--clip none:
as written; --clip p: Imagen's dynamic thresholding). It imports schedule.py, model.py and
guidance.py (and fast_cpu.py where present): the four files lift out together.

    python sample.py --ckpt cifar10-cpu --w 0 1 2 4 --out grid.png   # a shipped model, or a path
    python sample.py --ckpt out/mnist/ckpt.pt --sampler dpmpp2m-sde    # 24 steps
    python sample.py --ckpt ... --guidance interval -p logsnr_lo=-4 logsnr_hi=0
    python sample.py --ckpt ... --guidance classifier --guide-ckpt noisy-classifier-mnist-4k
    python sample.py --ckpt ... --npz samples.npz --json run.json    # for programs
    torchrun --nproc_per_node=4 sample.py --ckpt ... --npz samples.npz
"""
import argparse
import functools
import importlib.util
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import guidance as guidance_lib
import model as model_lib
import schedule
from guidance import guided_eps

# ---------------- line 5: the step from λ to λ′ > λ
# Every step takes z = z_t, x = x̃_t (after line 4), λ_t, λ_t+1 and by keyword: v (the
# variance blend); noise (N(0, I), for steps marked `noise` in SAMPLERS); x_prev and
# logsnr_prev (x̃, λ of the step before; None at t = 1); eps (a rule's own ε to
# re-noise with, e.g. CFG++'s ε_θ(z, ∅), for steps marked `renoise`). Else None.

def ancestral_step(z, x, logsnr, logsnr_next, *, v, noise, x_prev=None, logsnr_prev=None,
                   eps=None):
    """Alg. 2, line 5: z′ = μ̃_{λ′|λ}(z, x̃) + ((σ̃²_{λ′|λ})^{1−v} (σ²_{λ|λ′})^v)^{1/2} noise."""
    mean, _ = schedule.q_posterior(z, x, logsnr, logsnr_next)
    return mean + schedule.reverse_variance(logsnr, logsnr_next, v).sqrt() * noise


def ddim_step(z, x, logsnr, logsnr_next, *, v=None, noise=None, x_prev=None, logsnr_prev=None,
              eps=None):
    """DDIM (η = 0) from λ to λ′: z′ = α_λ′ x̃ + σ_λ′ ε̂, ε̂ = (z − α_λ x̃)/σ_λ, written as
    DPM-Solver's first-order step z′ = (σ_λ′/σ_λ) z + α_λ′ (1 − e^{−h}) x̃, h = (λ′ − λ)/2
    (no 1/σ_λ). eps: re-noise with it, z′ = α_λ′ x̃ + σ_λ′ ε (CFG++'s ε_θ(z, ∅))."""
    logsnrs = torch.tensor([logsnr, logsnr_next], dtype=torch.float64)
    alpha, sigma = (t.tolist() for t in schedule.alpha_sigma(logsnrs))
    if eps is not None:
        return alpha[1] * x + sigma[1] * eps
    h = (logsnr_next - logsnr) / 2
    return (sigma[1] / sigma[0]) * z + alpha[1] * -math.expm1(-h) * x


def extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next):
    """DPM-Solver++(2M)'s data prediction for the step λ → λ′: D = x̃ + (x̃ − x̃_prev)/(2r),
    r = (λ − λ_prev)/(λ′ − λ), linear in λ through x̃_prev and x̃. D = x̃ at the first step."""
    if x_prev is None:
        return x
    r = (logsnr - logsnr_prev) / (logsnr_next - logsnr)  # a ratio of steps: λ or λ/2 alike
    return x + (x - x_prev) / (2 * r)


def dpmpp2m_step(z, x, logsnr, logsnr_next, *, v=None, noise=None, x_prev=None,
                 logsnr_prev=None, eps=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction, in λ:
    the DDIM step with x̃ replaced by D (`extrapolate_x`). The probability-flow ODE."""
    x = extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next)
    return ddim_step(z, x, logsnr, logsnr_next)


def dpmpp2m_sde_step(z, x, logsnr, logsnr_next, *, v=None, noise, x_prev=None,
                     logsnr_prev=None, eps=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; k-diffusion's dpmpp_2m_sde, η = 1), in λ:
    z′ = (σ_λ′/σ_λ) e^{−h} z + α_λ′ (1 − e^{−2h}) D + σ_λ′ (1 − e^{−2h})^{1/2} noise: line 5
    with v = 0 and x̃ replaced by D (`extrapolate_x`), the paper's sampler made second order.
    Its fresh noise corrects errors that the ODE carries (docs/results.md, "Fast sampling")."""
    x = extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next)
    return ancestral_step(z, x, logsnr, logsnr_next, v=0.0, noise=noise)


# Per sampler: its step; the default λ spacing and T (docs/results.md, "Fast sampling");
# whether it takes fresh noise; whether it re-noises with a rule's own ε (CFG++).
SAMPLERS = {
    "ancestral": dict(step=ancestral_step, spacing="cosine", steps=256, noise=True),  # paper
    "ddim": dict(step=ddim_step, spacing="cosine", steps=256, renoise=True),
    "dpmpp2m": dict(step=dpmpp2m_step, spacing="uniform", steps=24),
    "dpmpp2m-sde": dict(step=dpmpp2m_sde_step, spacing="uniform", steps=24, noise=True),
}
FAST_SAMPLER = "dpmpp2m-sde"  # the few-step choice, guided and unguided
RULE_STEPS = {"cfgpp": 50}  # a rule's T unless --steps: CFG++ grows with T (its paper's code: 50)
GRID_PER_CLASS = 2  # images per class in the PNG, so that a grid of ten classes reads on a screen


# ---------------- line 4: x̃ kept in the data range

def dynamic_threshold(x, p):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample:
    s = max(1, the p-quantile of |x̃|), x̃ ← clip(x̃, −s, s) / s. s = 1: the fixed clip."""
    s = torch.quantile(x.abs().flatten(1), p, dim=1).clamp(min=1)  # (B,), as numpy's percentile
    s = schedule.per_example(s, x)  # (B,) -> (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x, s), -s) / s


# ---------------- the loop, written once

def logsnr_steps(steps, spacing="cosine"):
    """λ_1 = λ_min < … < λ_T = λ_max, float64 (T,): a schedule at evenly spaced u from 1 to 0."""
    return schedule.logsnr_schedule(torch.linspace(1, 0, steps, dtype=torch.float64), spacing)


def noise_seed(seed, c, j):
    """The seed of image j of class c: its noise, whatever the w, batch or process count."""
    return int(np.random.SeedSequence([seed, c, j]).generate_state(1)[0])


def _randn(shape, generator, device):
    """N(0, I) of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@torch.no_grad()
def sample(model, labels, w, steps=None, sampler="ancestral", spacing=None, v=0.3, clip_x=True,
           guidance=guided_eps, shape=None, generator=None, progress=None):
    """Algorithm 2 with a step of SAMPLERS and a rule: x̃ per label, (B, *shape) float32.

    labels: (B,) long, on the sampling device. w: a number or (B,). steps, spacing: T and the
    λ spacing (default: the sampler's). v ∈ [0, 1]: line 5's blend. clip_x: True clips x̃ to
    [−1, 1], False leaves it (the paper), a float p in (0, 1] is dynamic thresholding. guidance:
    line 3's rule, given a fresh `state` dict per run. shape: one sample's (default:
    model.config's). generator: a torch.Generator or a list of B (row i then depends on
    generator i alone). progress: True for a tqdm bar, or progress(t, T) after each step."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[sampler]
    steps = steps or sampler["steps"]
    if steps < 1 or not 0 <= v <= 1:
        raise ValueError(f"need steps >= 1 and 0 <= v <= 1, got {steps} and {v}")
    is_percentile = isinstance(clip_x, float) and 0 < clip_x <= 1
    if not (isinstance(clip_x, bool) or is_percentile):
        raise ValueError("clip_x must be True, False or a percentile p in (0, 1] "
                         f"(dynamic thresholding), got {clip_x!r}")
    if shape is None:
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    B, device = len(labels), labels.device
    logsnrs = logsnr_steps(steps, spacing or sampler["spacing"]).tolist()  # λ_1 < … < λ_T
    bar = None
    if progress is True:
        from tqdm import tqdm  # only this bar needs it
        bar = tqdm(total=steps, desc="sampling", leave=False)
        def progress(t, T):
            bar.update(1)

    state = {}  # the rule's memory for this run (APG's momentum)
    z = _randn((B, *shape), generator, device)  # Alg. 2, line 1
    x_prev = None
    for t in range(steps):  # Alg. 2, line 2
        logsnr = torch.full((B,), logsnrs[t], device=device)  # λ_t, (B,)
        eps = guidance(model, z, logsnr, labels, w, state)  # Alg. 2, line 3
        eps, eps_renoise = eps if isinstance(eps, tuple) else (eps, None)  # CFG++: a pair
        if eps_renoise is not None and not sampler.get("renoise"):
            raise ValueError("this guidance rule re-noises with its own ε (CFG++), which only "
                             "these samplers take: "
                             + ", ".join(k for k, s in SAMPLERS.items() if s.get("renoise")))
        x = schedule.predict_x(z, eps, logsnr)  # Alg. 2, line 4
        if clip_x is True:
            # Deviation from the paper: x̃ clipped to the data range [−1, 1] (as DDPM, ADM);
            # the paper does not say. Large w pushes x̃ far out. --clip none: the paper.
            x = x.clamp(-1, 1)
        elif clip_x:  # a percentile p: Imagen's dynamic thresholding instead
            x = dynamic_threshold(x, clip_x)
        if progress:
            progress(t + 1, steps)
        if t == steps - 1:
            break  # Alg. 2, line 5: z_{T+1} = x̃_T
        noise = _randn(z.shape, generator, device) if sampler.get("noise") else None
        logsnr_prev = logsnrs[t - 1] if t else None
        z = sampler["step"](z, x, logsnrs[t], logsnrs[t + 1], v=v, noise=noise,  # Alg. 2, line 5
                            x_prev=x_prev, logsnr_prev=logsnr_prev, eps=eps_renoise)
        x_prev = x
    if bar is not None:
        bar.close()
    return x  # Alg. 2, line 7


def write_atomic(path, write):
    """write(f) to a temporary file beside `path`, then os.replace (cli.atomic_write's twin)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_grid(images, path, row_labels, col_labels, title=None):
    """Write images (rows, cols, n, C, H, W) in [−1, 1] as one labelled PNG, n per cell."""
    from matplotlib.figure import Figure  # only the grid needs matplotlib
    images = (torch.as_tensor(images).float().clamp(-1, 1) + 1) / 2  # [0, 1]
    R, K, n, C, H, W = images.shape
    gap = max(1, H // 7)  # white space between cells
    canvas = torch.ones(C, R * H + (R + 1) * gap, K * n * W + (K + 1) * gap)
    for r in range(R):
        for k in range(K):
            top, left = gap + r * (H + gap), gap + k * (n * W + gap)
            cell = images[r, k].permute(1, 2, 0, 3).reshape(C, H, n * W)  # (C, H, n*W)
            canvas[:, top:top + H, left:left + n * W] = cell
    zoom, dpi = max(1, round(48 / H)), 100  # screen pixels per image pixel
    fig = Figure(figsize=(canvas.shape[2] * zoom / dpi, canvas.shape[1] * zoom / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    if C == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, C)
    ax.set_xticks([gap + k * (n * W + gap) + n * W / 2 - 0.5 for k in range(K)], col_labels)
    ax.set_yticks([gap + r * (H + gap) + H / 2 - 0.5 for r in range(R)], row_labels)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    if title:
        ax.set_title(title)
    write_atomic(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))


def to_uint8(x):
    """[−1, 1] -> uint8 {0, …, 255}, as data.to_uint8 (repeated: sample.py lifts out alone)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def parse_classes(text, num_classes):
    """'0-9', '3,5,7' or 'all' -> a list of class indices, each checked against the model."""
    if text == "all":
        return list(range(num_classes))
    classes = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            classes += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError("expected 'all', a range like 0-9 or a list like 3,5,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"classes {bad or 'none'} are outside this model's range "
                         f"0-{num_classes - 1}")
    return classes


# ---------------- the command line

def fail(message):
    """Bad input: one line on stderr (rank 0), exit code 2, no traceback (cli.fail's twin)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def rule_parameters(rule):
    """({name: default} of a rule's keyword parameters, (name, class) of its second network
    or None), from the signature: a keyword without a default is a network, by annotation."""
    params, network = {}, None
    for p in inspect.signature(rule).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            if p.default is p.empty:
                network = (p.name, p.annotation)
            else:
                params[p.name] = p.default
    return params, network


def rules_help():
    """Each rule's parameters and defaults, and its second network, for --help."""
    parts = []
    for name, rule in guidance_lib.RULES.items():
        params, network = rule_parameters(rule)
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in params.items())
        needs = network and f"--guide-ckpt a {network[1].__name__}"
        parts.append(f"{name}: " + "; ".join(filter(None, [text, needs])))
    return "; ".join(p for p in parts if not p.endswith(": "))


def bind_rule(name, pairs, guide):
    """The rule `name` with its KEY=VALUE parameters (each read as its default's type) and
    its second network bound; ValueError, one line, for a bad key, value or network."""
    rule = guidance_lib.RULES[name]
    params, network = rule_parameters(rule)
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in params:
            takes = ", ".join(f"{k}=VALUE" for k in params) or "no parameters"
            raise ValueError(f"--guidance-param {pair!r}: --guidance {name} takes {takes}")
        try:
            kwargs[key] = type(params[key])(value)
        except ValueError:
            kind = type(params[key]).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            raise ValueError(f"--guidance-param {pair!r}: {value!r} is not {article} {kind}") \
                from None
    if network is None and guide is not None:
        raise ValueError("--guide-ckpt goes with a rule that takes a second network, "
                         f"not --guidance {name}")
    if network is not None:
        if not isinstance(guide, network[1]):
            found = type(guide).__name__ if guide is not None else "nothing"
            is_classifier = network[1] is model_lib.NoisyClassifier
            script = "noisy_classifier.py" if is_classifier else "train.py"
            raise ValueError(f"--guidance {name} needs --guide-ckpt with a "
                             f"{network[1].__name__} ({script}), got {found}")
        kwargs[network[0]] = guide
    return functools.partial(rule, **kwargs) if kwargs else rule


def parse_clip(text):
    """--clip: 'fixed' (x̃ clipped to [−1, 1]), 'none' (the paper) or a percentile p in (0, 1]."""
    if text in ("fixed", "none"):
        return text == "fixed"
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0 < p <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use fixed, none, or a percentile p in (0, 1] (Imagen: 0.995)")
    return p


def check_same_data(guide, guide_ckpt, model, ckpt, path):
    """A classifier or guide model must be of the model's data: dataset, image shape, classes."""
    dataset = ckpt.get("args", {}).get("dataset", "")
    for what, theirs, ours in [
            ("dataset", guide_ckpt.get("args", {}).get("dataset", ""), dataset),
            ("image size", guide.config.image_size, model.config.image_size),
            ("channels", guide.config.in_channels, model.config.in_channels),
            ("number of classes", guide.config.num_classes, model.config.num_classes)]:
        if theirs != ours and "" not in (theirs, ours):  # unchecked where a checkpoint is silent
            fail(f"--guide-ckpt {path} has {what} {theirs!r} but --ckpt has {ours!r}: "
                 "train it on the same data")


def check_writable(*paths):
    """Each given output path can be written (its folder made, a probe file), else fail."""
    for path in filter(None, paths):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            open(f"{path}.tmp{os.getpid()}", "wb").close()
            os.remove(f"{path}.tmp{os.getpid()}")
        except OSError as e:
            fail(f"cannot write {path}: {e.strerror}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint of train.py (EMA weights used) or a "
                   "shipped model's name (checkpoints/README.md)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                   help="guidance strengths, the paper's w (0: no guidance; default 0 0.5 1 2 4)")
    p.add_argument("--classes", default="all", help="'all', a range '0-9' or a list '3,5,7'")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ancestral",
                   help=f"line 5's step (default ancestral, the paper's; fast: {FAST_SAMPLER})")
    per_sampler = ", ".join(f"{k} {d['steps']}" for k, d in SAMPLERS.items())
    p.add_argument("--steps", type=int, help=f"T (default per sampler: {per_sampler}; paper: 256; "
                   f"--guidance cfgpp: {RULE_STEPS['cfgpp']}, as its strength grows with T)")
    p.add_argument("--v", type=float, default=0.3, help="ancestral's variance blend (paper: 0.3)")
    p.add_argument("--clip", type=parse_clip, default=True, metavar="{fixed,none,P}",
                   help="x̃ clipped to [-1, 1] (fixed: default, a deviation), left as it is "
                   "(none: the paper) or Imagen's dynamic thresholding at percentile P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("out", "samples.png"), help="the PNG: a row "
                   f"per w, a column per class, {GRID_PER_CLASS} images each at most (npz: all)")
    p.add_argument("--npz", default=None, help="also write uint8 images (N, H, W, C), labels, w")
    p.add_argument("--json", metavar="PATH", help="also write the run's summary as JSON")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (per process)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--guidance", choices=list(guidance_lib.RULES), default="cfg",
                   help="line 3's rule (guidance.py), on the paper's w (default: cfg, the paper's)")
    p.add_argument("--guide-ckpt", help="the rule's second network, a path or a shipped name: a "
                   "noisy classifier (noisy_classifier.py); for autoguidance, a worse model")
    p.add_argument("--guidance-param", "-p", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"the rule's parameters (defaults: {rules_help()})")
    p.error = fail
    args = p.parse_args(argv)

    for flag, n in [("--steps", args.steps), ("--n-per-class", args.n_per_class),
                    ("--batch-size", args.batch_size)]:
        if n is not None and n < 1:
            fail(f"{flag} must be at least 1, got {n}")
    if not 0 <= args.v <= 1:
        fail(f"--v {args.v} is outside [0, 1] (paper: 0.3)")
    if not all(math.isfinite(w) for w in args.w):
        fail(f"--w {args.w} must be finite numbers")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available; use --device cpu")
    check_writable(args.out, args.npz, args.json)  # fail now, not after sampling
    try:
        model, ckpt = model_lib.load_model(args.ckpt)
        guide, guide_ckpt = (model_lib.load_model(args.guide_ckpt) if args.guide_ckpt
                             else (None, None))
        if not isinstance(model, model_lib.UNet):
            raise ValueError(f"--ckpt {args.ckpt} is a {type(model).__name__}, "
                             "not a diffusion model (train.py)")
        classes = parse_classes(args.classes, model.config.num_classes)
        rule = bind_rule(args.guidance, args.guidance_param, guide)
    except (model_lib.CheckpointError, ValueError) as e:
        fail(str(e))
    if guide is not None:
        check_same_data(guide, guide_ckpt, model, ckpt, args.guide_ckpt)
    if args.device == "cpu" and importlib.util.find_spec("fast_cpu"):  # absent in a lifted-out copy
        importlib.import_module("fast_cpu").keep_freed_memory()  # this project's CPU setting

    # Under torchrun the images are split across processes by index; rank 0 writes them.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if "RANK" in os.environ and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    for net in filter(None, [model, guide]):
        net.to(device)  # in place: the bound rule holds the guide
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    # Image (w, class, j) draws its noise from its own generator (noise_seed).
    grid = [(w, c, j) for w in args.w for c in classes for j in range(args.n_per_class)]
    ws, labels = torch.tensor([w for w, _, _ in grid]), torch.tensor([c for _, c, _ in grid])
    seeds = [noise_seed(args.seed, c, j) for _, c, j in grid]
    mine = list(range(rank, len(grid), world_size))  # this process's images
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    steps = args.steps or RULE_STEPS.get(args.guidance) or SAMPLERS[args.sampler]["steps"]
    from tqdm import tqdm  # the library does not need it
    bar = tqdm(total=len(batches) * steps, desc=f"{len(grid)} images", disable=rank != 0 or None)
    start, images = time.time(), {}  # image index -> uint8 (C, H, W)
    try:
        for batch in batches:
            generators = [torch.Generator().manual_seed(seeds[i]) for i in batch]
            x = sample(model, labels[batch].to(device), ws[batch].to(device), steps,
                       args.sampler, v=args.v, clip_x=args.clip, guidance=rule,
                       generator=generators, progress=lambda t, T: bar.update(1))
            images.update(zip(batch, to_uint8(x).cpu()))
    except ValueError as e:  # w or a parameter outside a rule's range: the rule's own check
        fail(str(e))
    bar.close()
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(images, gathered, dst=0)
        if rank == 0:
            images = {i: x for part in gathered for i, x in part.items()}
    if "RANK" in os.environ:
        dist.destroy_process_group()
    if rank != 0:
        return
    images = torch.stack([images[i] for i in range(len(grid))])  # (N, C, H, W) uint8
    names = ckpt.get("class_names") or [str(c) for c in range(model.config.num_classes)]
    params = " ".join(args.guidance_param + [os.path.basename(args.guide_ckpt or "")])
    title = (f"{ckpt.get('args', {}).get('dataset', '')} {args.sampler}, T = {steps}"
             + (f", v = {args.v}" if args.sampler == "ancestral" else "")
             + f", guidance {args.guidance} {params}"
             + (f", dynamic threshold p = {args.clip:g}" if isinstance(args.clip, float) else ""))
    cells = images.float().reshape(len(args.w), len(classes), args.n_per_class,
                                   *images.shape[1:])[:, :, :GRID_PER_CLASS] / 127.5 - 1
    try:
        save_grid(cells, args.out, [f"w = {w:g}" for w in args.w],
                  [names[c] for c in classes], title.strip())
        if args.npz:
            write_atomic(args.npz, lambda f: np.savez(
                f, images=images.permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                labels=labels.numpy(), w=ws.numpy()))
        seconds = time.time() - start
        summary = dict(images=len(grid), seconds=seconds, processes=world_size, out=args.out,
                       npz=args.npz, w=args.w, classes=classes, n_per_class=args.n_per_class,
                       sampler=args.sampler, steps=steps, guidance=args.guidance)
        if args.json:
            write_atomic(args.json, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    except OSError as e:
        fail(f"cannot write the output: {e}")
    print(f"{len(grid)} images in {seconds:.1f} s on {world_size} process(es) -> {args.out}"
          + (f", {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()

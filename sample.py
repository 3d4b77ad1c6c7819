"""Guided sampling of Classifier-Free Diffusion Guidance: Algorithm 2's loop, its steps, and the command.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Algorithm 2, with an
increasing log-SNR sequence λ_1 = λ_min < … < λ_T = λ_max and guidance strength w (w = 0: the
conditional model; w = −1: the unconditional):

    1: z_1 ~ N(0, I)
    2: for t = 1, …, T:
    3:     ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)
    4:     x̃_t = (z_t − σ_λt ε̃_t) / α_λt
    5:     z_{t+1} ~ N(μ̃_{λt+1|λt}(z_t, x̃_t), (σ̃²_{λt+1|λt})^{1−v} (σ²_{λt|λt+1})^v)  if t < T,  else z_{t+1} = x̃_t
    7: return z_{T+1}

The loop is written once (`sample`), with no branch on a rule's or a sampler's name; two things plug into it:
- line 3, the guidance rule: guidance.py holds every one (`guidance.RULES`: the paper's `guidance.guided_eps`,
  classifier guidance, and the rules after the paper), each rule(model, z, logsnr, labels, w, state) -> ε̃;
- line 5, the step (the paper: "could be replaced by another sampler, e.g. DDIM"), one of `SAMPLERS`, each a
  pure function with one signature, step(z, x, logsnr, logsnr_next, *, v, noise, x_prev, logsnr_prev, eps):
  "ancestral"   Algorithm 2's line 5 as written (`ancestral_step`, variance blend v);
  "ddim"        the deterministic DDIM step z_{t+1} = α_λt+1 x̃_t + σ_λt+1 ε̂_t (`ddim_step`);
  "dpmpp2m"     DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the probability-flow ODE
                with data prediction (`dpmpp2m_step`): DDIM with x̃_t extrapolated from x̃_t and x̃_{t−1};
  "dpmpp2m-sde" its SDE form (`dpmpp2m_sde_step`): line 5 with v = 0 and the same extrapolated x̃_t, fresh
                noise each step like the paper's sampler. The few-step choice (FAST_SAMPLER).
A new sampler is one step function and one entry of SAMPLERS. The λ_t are taken at evenly spaced u of a schedule:
"cosine" (the paper's: the cosine schedule of training) or "uniform" (λ evenly spaced, DPM-Solver's choice);
each sampler has its measured default spacing and T (docs/results.md, "Fast sampling").

The paper's w everywhere; libraries that use a "scale" s (diffusers' guidance_scale, k-diffusion's
cfg_scale) have s = 1 + w. Deviation from the paper: x̃ is clipped to [−1, 1] by default, as in DDPM and ADM
(the paper does not say); `clip_x=False` / `--clip none` gives Algorithm 2 as written, and `clip_x=p` /
`--clip p` Imagen's dynamic thresholding at percentile p (`dynamic_threshold`).

The library (`sample`, the steps, `dynamic_threshold`, `save_grid`) imports only schedule.py, model.py and
guidance.py from the project; matplotlib and tqdm are imported only where a grid or a progress bar is drawn, so
the four files lift out into another project together. Command line:

    python sample.py --ckpt out/mnist/ckpt.pt --w 0 0.5 1 2 4 --classes 0-9 --n-per-class 8 \
        --sampler ancestral --steps 256 --v 0.3 --seed 0 --out samples.png --npz samples.npz
    python sample.py --ckpt out/mnist/ckpt.pt --sampler dpmpp2m-sde      # few steps (24)
    python sample.py --ckpt out/mnist/ckpt.pt --guidance classifier --guide-ckpt out/classifier-noisy/mnist/ckpt.pt
    python sample.py --ckpt out/mnist/ckpt.pt --guidance interval -p logsnr_lo=-4 logsnr_hi=0 --w 1 3
    torchrun --nproc_per_node=4 sample.py --ckpt ... --npz samples.npz   # images split across processes
"""
import argparse
import functools
import inspect
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

# ------------------------------------------------------------------ line 5: the step from λ to λ′ > λ
# Every step takes the same arguments: z = z_t, x = x̃_t (after line 4), λ_t and λ_t+1 (numbers), and by keyword
# v (line 5's variance blend), noise (N(0, I) of z's shape, drawn for the steps marked `noise` in SAMPLERS, else
# None), x_prev and logsnr_prev (x̃ and λ of the step before, None at t = 1), and eps (the ε to re-noise with that a
# rule gave, e.g. CFG++'s ε_θ(z, ∅), for the steps marked `renoise`; else None).

def ancestral_step(z, x, logsnr, logsnr_next, *, v, noise, x_prev=None, logsnr_prev=None, eps=None):
    """Alg. 2, line 5: z′ = μ̃_{λ′|λ}(z, x̃) + ((σ̃²_{λ′|λ})^{1−v} (σ²_{λ|λ′})^v)^{1/2} · noise, noise ~ N(0, I)."""
    mean, _ = schedule.q_posterior(z, x, logsnr, logsnr_next)
    return mean + schedule.reverse_variance(logsnr, logsnr_next, v).sqrt() * noise


def ddim_step(z, x, logsnr, logsnr_next, *, v=None, noise=None, x_prev=None, logsnr_prev=None, eps=None):
    """DDIM (η = 0) from λ to λ′: z′ = α_λ′ x̃ + σ_λ′ ε̂, where ε̂ = (z − α_λ x̃)/σ_λ goes with x̃.

    Written as DPM-Solver's first-order step: z′ = (σ_λ′/σ_λ) z + α_λ′ (1 − e^{−h}) x̃, with
    h = (λ′ − λ)/2, the step in DPM-Solver's half log-SNR log(α/σ) = λ/2 (the same number; no 1/σ_λ).
    eps: re-noise with this ε instead of ε̂, z′ = α_λ′ x̃ + σ_λ′ ε (CFG++, guidance.cfgpp_eps: ε_θ(z, ∅))."""
    alpha, sigma = (t.tolist() for t in schedule.alpha_sigma(torch.tensor([logsnr, logsnr_next], dtype=torch.float64)))
    if eps is not None:
        return alpha[1] * x + sigma[1] * eps
    h = (logsnr_next - logsnr) / 2
    return (sigma[1] / sigma[0]) * z + alpha[1] * -math.expm1(-h) * x


def extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next):
    """DPM-Solver++(2M)'s data prediction over the step λ → λ′: D = x̃ + (x̃ − x̃_prev) / (2r), r = (λ − λ_prev) /
    (λ′ − λ), the linear extrapolation from x̃_prev (at λ_prev) and x̃ (r is a ratio of steps, the same in λ or in
    DPM-Solver's λ/2). With no previous x̃ (the first step) D = x̃, and the step is first order."""
    if x_prev is None:
        return x
    r = (logsnr - logsnr_prev) / (logsnr_next - logsnr)
    return x + (x - x_prev) / (2 * r)


def dpmpp2m_step(z, x, logsnr, logsnr_next, *, v=None, noise=None, x_prev=None, logsnr_prev=None, eps=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, in the paper's λ:
    the DDIM step with x̃ replaced by D (`extrapolate_x`). The probability-flow ODE, deterministic."""
    return ddim_step(z, extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next), logsnr, logsnr_next)


def dpmpp2m_sde_step(z, x, logsnr, logsnr_next, *, v=None, noise, x_prev=None, logsnr_prev=None, eps=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; k-diffusion's dpmpp_2m_sde, η = 1), in the paper's λ:
    z′ = (σ_λ′/σ_λ) e^{−h} z + α_λ′ (1 − e^{−2h}) D + σ_λ′ (1 − e^{−2h})^{1/2} · noise, h = (λ′ − λ)/2.

    That is Algorithm 2's line 5 with v = 0 (mean μ̃_{λ′|λ}(z, D), variance σ̃²_{λ′|λ} = σ²_λ′ (1 − e^{λ−λ′})) and
    x̃ replaced by D (`extrapolate_x`): the paper's ancestral sampler made second order. It samples the reverse
    SDE, whose fresh noise corrects the network's errors where the ODE carries them (docs/results.md)."""
    return ancestral_step(z, extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next), logsnr, logsnr_next,
                          v=0.0, noise=noise)


# Per sampler: its step, the λ spacing and the number of steps T when none is given (measured: docs/results.md,
# "Fast sampling"), whether the step takes fresh noise, and whether it re-noises with a rule's own ε (CFG++).
SAMPLERS = {
    "ancestral": dict(step=ancestral_step, spacing="cosine", steps=256, noise=True),  # the paper's T = 256
    "ddim": dict(step=ddim_step, spacing="cosine", steps=256, renoise=True),
    "dpmpp2m": dict(step=dpmpp2m_step, spacing="uniform", steps=24),
    "dpmpp2m-sde": dict(step=dpmpp2m_sde_step, spacing="uniform", steps=24, noise=True),
}
FAST_SAMPLER = "dpmpp2m-sde"  # the few-step choice, guided and unguided (docs/results.md, "Fast sampling")


# ------------------------------------------------------------------ line 4: x̃ kept in the data range

def dynamic_threshold(x, p):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample: s = max(1, the p-quantile of |x̃|
    over the sample's pixels), x̃ ← clip(x̃, −s, s) / s. Where s = 1 it is the fixed clip to [−1, 1]."""
    s = torch.quantile(x.abs().flatten(1), p, dim=1).clamp(min=1)  # (B,), linear interpolation as numpy's percentile
    s = schedule.per_example(s, x)  # (B,) -> (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x, s), -s) / s


# ------------------------------------------------------------------ the loop, written once

def logsnr_steps(steps, spacing="cosine"):
    """λ_1 = λ_min < … < λ_T = λ_max (float64, (T,)): a schedule at evenly spaced u from 1 to 0."""
    return schedule.logsnr_schedule(torch.linspace(1, 0, steps, dtype=torch.float64), spacing)


def _randn(shape, generator, device):
    """N(0, I) of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else device).to(device)


@torch.no_grad()
def sample(model, labels, w, steps=None, sampler="ancestral", spacing=None, v=0.3, clip_x=True,
           guidance=guided_eps, shape=None, generator=None, progress=None):
    """Algorithm 2 with the given step (one of SAMPLERS) and guidance rule: one sample x̃ per label.

    labels: (B,) long, on the device to sample on. w: a number or a (B,) tensor. steps, spacing: T and
    the λ spacing, by default the sampler's. clip_x: True clips x̃ to [−1, 1], False leaves it (the paper),
    a float p in (0, 1] applies Imagen's dynamic thresholding at percentile p instead (`dynamic_threshold`).
    guidance: the rule of line 3 (guidance.py); it gets a fresh `state` dict for this run. shape: one sample's
    shape, (C, H, W) from model.config by default. generator: a torch.Generator, or a list of B of them (row i
    then depends on generator i alone, whatever else is in the batch). progress: True for a tqdm bar, or a
    callable progress(t, T) run after each step. Returns (B, *shape) float32.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[sampler]
    steps = steps or sampler["steps"]
    if steps < 1 or not 0 <= v <= 1:
        raise ValueError(f"need steps >= 1 and 0 <= v <= 1, got {steps} and {v}")
    if not (isinstance(clip_x, bool) or isinstance(clip_x, float) and 0 < clip_x <= 1):
        raise ValueError(f"clip_x must be True, False or a percentile p in (0, 1] (dynamic thresholding), "
                         f"got {clip_x!r}")
    if shape is None:
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    B, device = len(labels), labels.device
    logsnrs = logsnr_steps(steps, spacing or sampler["spacing"]).tolist()  # λ_1 < … < λ_T
    bar = None
    if progress is True:
        from tqdm import tqdm  # imported here: the library needs it only for this bar
        bar = tqdm(total=steps, desc="sampling", leave=False)
        progress = lambda t, T: bar.update(1)

    state = {}  # the rule's memory for this run (APG's momentum)
    z = _randn((B, *shape), generator, device)  # Alg. 2, line 1
    x_prev = None
    for t in range(steps):  # Alg. 2, line 2
        logsnr = torch.full((B,), logsnrs[t], device=device)  # λ_t, (B,)
        eps = guidance(model, z, logsnr, labels, w, state)  # Alg. 2, line 3
        eps, eps_renoise = eps if isinstance(eps, tuple) else (eps, None)  # a pair: the rule re-noises with its own ε
        if eps_renoise is not None and not sampler.get("renoise"):
            raise ValueError("this guidance rule re-noises with its own ε (CFG++), which only these samplers take: "
                             + ", ".join(k for k, s in SAMPLERS.items() if s.get("renoise")))
        x = schedule.predict_x(z, eps, logsnr)  # Alg. 2, line 4
        if clip_x is True:
            # Deviation from the paper: x̃ is clipped to the data range [−1, 1] (as in DDPM and ADM); the
            # paper does not say. Without it, large w pushes x̃ far outside the data range. --clip none for the paper.
            x = x.clamp(-1, 1)
        elif clip_x:  # a percentile p: Imagen's dynamic thresholding in place of the fixed clip
            x = dynamic_threshold(x, clip_x)
        if progress:
            progress(t + 1, steps)
        if t == steps - 1:
            break  # Alg. 2, line 5: z_{T+1} = x̃_T
        noise = _randn(z.shape, generator, device) if sampler.get("noise") else None
        z = sampler["step"](z, x, logsnrs[t], logsnrs[t + 1], v=v, noise=noise, x_prev=x_prev,  # Alg. 2, line 5
                            logsnr_prev=logsnrs[t - 1] if t else None, eps=eps_renoise)
        x_prev = x
    if bar is not None:
        bar.close()
    return x  # Alg. 2, line 7


def save_grid(images, path, row_labels, col_labels, title=None):
    """Write images (rows, cols, n, C, H, W) in [−1, 1] as one labelled PNG: n samples side by side per cell."""
    from matplotlib.figure import Figure  # imported here: only the grid needs matplotlib
    images = (torch.as_tensor(images).float().clamp(-1, 1) + 1) / 2  # [0, 1]
    R, K, n, C, H, W = images.shape
    gap = max(1, H // 7)  # white space between cells
    canvas = torch.ones(C, R * H + (R + 1) * gap, K * n * W + (K + 1) * gap)
    for r in range(R):
        for k in range(K):
            top, left = gap + r * (H + gap), gap + k * (n * W + gap)
            cell = images[r, k].permute(1, 2, 0, 3).reshape(C, H, n * W)  # (n, C, H, W) -> (C, H, n*W)
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
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)


def to_uint8(x):
    """[−1, 1] -> uint8 {0, …, 255}, as data.to_uint8 (repeated so that sample.py lifts out on its own)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def parse_classes(text, num_classes):
    """'0-9', '3,5,7' or 'all' -> a list of class indices, each checked against the model's range."""
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
        raise ValueError(f"classes {bad or 'none'} are outside this model's range 0-{num_classes - 1}")
    return classes


# ------------------------------------------------------------------ the command line

def fail(message):
    """Bad input: one line on stderr (rank 0 only), exit code 2, no traceback (train.fail's twin: this file lifts out
    without train.py)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def rule_parameters(rule):
    """({name: default} of a rule's keyword parameters, (name, class) of its second network or None), read from the
    rule's signature: a keyword parameter without a default is a network, annotated with its class."""
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
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        parts.append(f"{name}: " + "; ".join(filter(None, [text, network and f"--guide-ckpt a {network[1].__name__}"])))
    return "; ".join(p for p in parts if not p.endswith(": "))


def bind_rule(name, pairs, guide):
    """The rule `name` with its KEY=VALUE parameters (each VALUE read as its default's type) and its second network
    bound; ValueError with a one-line reason for an unknown key, a bad value or a missing or wrong network."""
    rule = guidance_lib.RULES[name]
    params, network = rule_parameters(rule)
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in params:
            raise ValueError(f"--guidance-param {pair!r}: --guidance {name} takes "
                             + (", ".join(f"{k}=VALUE" for k in params) or "no parameters"))
        try:
            kwargs[key] = type(params[key])(value)
        except ValueError:
            raise ValueError(f"--guidance-param {pair!r}: {value!r} is not a {type(params[key]).__name__}") from None
    if network is None and guide is not None:
        raise ValueError(f"--guide-ckpt goes with a rule that takes a second network, not --guidance {name}")
    if network is not None:
        if not isinstance(guide, network[1]):
            found = f"{type(guide).__name__}" if guide is not None else "nothing"
            raise ValueError(f"--guidance {name} needs --guide-ckpt with a {network[1].__name__} "
                             f"({'classifier.py' if network[1] is model_lib.NoisyClassifier else 'train.py'}), "
                             f"got {found}")
        kwargs[network[0]] = guide
    return functools.partial(rule, **kwargs) if kwargs else rule


def parse_clip(text):
    """--clip: 'fixed' (x̃ clipped to [−1, 1]), 'none' (the paper) or a percentile p in (0, 1] (dynamic thresholding)."""
    if text in ("fixed", "none"):
        return text == "fixed"
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use fixed, none, or a percentile p in (0, 1] (Imagen: 0.995)")
    return p


def check_same_data(guide, guide_ckpt, model, ckpt, path):
    """A classifier or guide model must be of the diffusion model's data: same dataset, image shape, classes."""
    dataset = ckpt.get("args", {}).get("dataset", "")
    for what, theirs, ours in [("dataset", guide_ckpt.get("args", {}).get("dataset", ""), dataset),
                               ("image size", guide.config.image_size, model.config.image_size),
                               ("channels", guide.config.in_channels, model.config.in_channels),
                               ("number of classes", guide.config.num_classes, model.config.num_classes)]:
        if theirs != ours and "" not in (theirs, ours):  # unchecked where a checkpoint does not say
            fail(f"--guide-ckpt {path} has {what} {theirs!r} but --ckpt has {ours!r}: train it on the same data")


def check_writable(*paths):
    """Each given output path can be written (a probe file beside it), else one line and exit code 2."""
    for path in filter(None, paths):
        try:
            open(f"{path}.tmp{os.getpid()}", "wb").close()
            os.remove(f"{path}.tmp{os.getpid()}")
        except OSError as e:
            fail(f"cannot write {path}: {e.strerror}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (EMA weights are used)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                   help="guidance strengths, the paper's w (0 = no guidance; default 0 0.5 1 2 4)")
    p.add_argument("--classes", default="all", help="'all', a range '0-9' or a list '3,5,7'")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ancestral", help="the step of line 5 (default "
                   "ancestral, the paper's; " + FAST_SAMPLER + " for few steps)")
    p.add_argument("--steps", type=int, help="T (default per sampler: " +
                   ", ".join(f"{k} {d['steps']}" for k, d in SAMPLERS.items()) + "; paper: 256)")
    p.add_argument("--v", type=float, default=0.3, help="variance interpolation of the ancestral step (paper: 0.3)")
    p.add_argument("--clip", type=parse_clip, default=True, metavar="{fixed,none,P}", help="x̃ clipped to [-1, 1] "
                   "(fixed, the default; a deviation: the paper does not say), left as it is (none), or Imagen's "
                   "dynamic thresholding at percentile P: s = max(1, the P-quantile of |x̃|), x̃ <- clip(x̃, -s, s)/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write uint8 images (N, H, W, C), labels and w")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (per process)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--guidance", choices=list(guidance_lib.RULES), default="cfg", help="line 3's rule (guidance.py), "
                   "on the paper's w axis: cfg, ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z) (the paper's), or another")
    p.add_argument("--guide-ckpt", help="the rule's second network: a noise-conditional classifier (classifier.py) "
                   "for classifier, a worse model of the same data (train.py) for autoguidance")
    p.add_argument("--guidance-param", "-p", nargs="+", default=[], metavar="KEY=VALUE",
                   help="the rule's parameters (defaults: " + rules_help() + ")")
    p.error = fail
    args = p.parse_args(argv)

    if args.steps is not None and args.steps < 1 or args.n_per_class < 1 or args.batch_size < 1:
        fail("--steps, --n-per-class and --batch-size must be at least 1")
    if not 0 <= args.v <= 1:
        fail(f"--v {args.v} is outside [0, 1] (paper: 0.3)")
    if not all(math.isfinite(w) for w in args.w):
        fail(f"--w {args.w} must be finite numbers")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available; use --device cpu")
    check_writable(args.out, args.npz)  # fail now, not after sampling
    try:
        model, ckpt = model_lib.load_model(args.ckpt)
        guide, guide_ckpt = model_lib.load_model(args.guide_ckpt) if args.guide_ckpt else (None, None)
        if not isinstance(model, model_lib.UNet):
            raise ValueError(f"--ckpt {args.ckpt} is a {type(model).__name__}, not a diffusion model (train.py)")
        classes = parse_classes(args.classes, model.config.num_classes)
        rule = bind_rule(args.guidance, args.guidance_param, guide)
    except (model_lib.CheckpointError, ValueError) as e:
        fail(str(e))
    if guide is not None:
        check_same_data(guide, guide_ckpt, model, ckpt, args.guide_ckpt)
    if args.device == "cpu":
        try:  # this project's CPU speed setting for sampling (fast_cpu.py); a lifted-out sample.py runs without it
            import fast_cpu
            fast_cpu.keep_freed_memory()
        except ImportError:
            pass

    # Under torchrun the images are split across the processes by index; rank 0 gathers and writes them.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if "RANK" in os.environ and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    for net in filter(None, [model, guide]):
        net.to(device)  # in place: the bound rule holds the guide
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    # Every image is (w, class, j). Its noise comes from its own generator seeded by (seed, class, j): the
    # same seed gives the same images whatever --batch-size or number of processes, and every w row starts
    # from the same noise.
    grid = [(w, c, j) for w in args.w for c in classes for j in range(args.n_per_class)]
    ws = torch.tensor([w for w, _, _ in grid])
    labels = torch.tensor([c for _, c, _ in grid])
    seeds = [int(np.random.SeedSequence([args.seed, c, j]).generate_state(1)[0]) for _, c, j in grid]
    mine = list(range(rank, len(grid), world_size))  # this process's images
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    steps = args.steps or SAMPLERS[args.sampler]["steps"]
    from tqdm import tqdm  # imported here: the library does not need it
    bar = tqdm(total=len(batches) * steps, desc=f"{len(grid)} images", disable=None if rank == 0 else True)
    start, images = time.time(), {}  # image index -> uint8 (C, H, W)
    try:
        for batch in batches:
            generators = [torch.Generator().manual_seed(seeds[i]) for i in batch]
            x = sample(model, labels[batch].to(device), ws[batch].to(device), steps, args.sampler, v=args.v,
                       clip_x=args.clip, guidance=rule, generator=generators, progress=lambda t, T: bar.update(1))
            images.update(zip(batch, to_uint8(x).cpu()))
    except ValueError as e:  # a rule's parameter or w outside its range: the rule's own one-line check
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
    params = " ".join(args.guidance_param) + (f" {os.path.basename(args.guide_ckpt)}" if args.guide_ckpt else "")
    title = (f"{ckpt.get('args', {}).get('dataset', '')} {args.sampler}, T = {steps}"
             + (f", v = {args.v}" if args.sampler == "ancestral" else "") + f", guidance {args.guidance} {params}"
             + (f", dynamic threshold p = {args.clip:g}" if args.clip is not True and args.clip else ""))
    try:
        save_grid(images.float().reshape(len(args.w), len(classes), args.n_per_class, *images.shape[1:]) / 127.5 - 1,
                  args.out, [f"w = {w:g}" for w in args.w], [names[c] for c in classes], title.strip())
        if args.npz:
            tmp = f"{args.npz}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.savez(f, images=images.permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                         labels=labels.numpy(), w=ws.numpy())
            os.replace(tmp, args.npz)
    except OSError as e:
        fail(f"cannot write the output: {e}")
    print(f"{len(grid)} images in {time.time() - start:.1f} s on {world_size} process(es) -> {args.out}"
          + (f", {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()

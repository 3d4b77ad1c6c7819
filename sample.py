"""Guided sampling of Classifier-Free Diffusion Guidance: Algorithm 2, exactly, plus DDIM and DPM-Solver++(2M)
in its ODE and SDE forms.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Algorithm 2, with an
increasing log-SNR sequence λ_1 = λ_min < … < λ_T = λ_max and guidance strength w (w = 0: the
conditional model; w = −1: the unconditional):

    1: z_1 ~ N(0, I)
    2: for t = 1, …, T:
    3:     ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)         (both in one batch of 2B)
    4:     x̃_t = (z_t − σ_λt ε̃_t) / α_λt
    5:     z_{t+1} ~ N(μ̃_{λt+1|λt}(z_t, x̃_t), (σ̃²_{λt+1|λt})^{1−v} (σ²_{λt|λt+1})^v)  if t < T,  else z_{t+1} = x̃_t
    7: return z_{T+1}

The loop is written once (`sample`); two things plug into it:
- the guidance rule, line 3: a function rule(model, z, logsnr, labels, w) -> ε̃. `guided_eps` is the
  paper's; other rules take the same arguments, e.g. classifier guidance with a noise-conditional
  classifier, functools.partial(classifier.classifier_guided_eps, classifier=clf) (classifier.py), and the
  rules after the paper in guidance.py (guidance interval, autoguidance, CFG rescale, APG, CFG++). A rule may
  return a pair (ε̃, ε to re-noise with): CFG++ re-noises with ε_θ(z_λ, ∅), which only the ddim step takes;
- the step, line 5 (the paper: "could be replaced by another sampler, e.g. DDIM"):
  "ancestral"  Algorithm 2's line 5 as written (`ancestral_step`, variance blend v);
  "ddim"       the deterministic DDIM step z_{t+1} = α_λt+1 x̃_t + σ_λt+1 ε̂_t (`ddim_step`);
  "dpmpp2m"    DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the
               probability-flow ODE with data prediction (`dpmpp2m_step`): DDIM with x̃_t extrapolated
               from x̃_t and x̃_{t−1}. Made for guided sampling at few steps;
  "dpmpp2m-sde" its SDE form (`dpmpp2m_sde_step`): line 5 with v = 0 and the same extrapolated x̃_t, fresh
               noise each step like the paper's sampler.
The λ_t are taken at evenly spaced u of a schedule: "cosine" (the paper's: the cosine schedule of
training, λ = −2 log tan(a u + b)) or "uniform" (λ evenly spaced, DPM-Solver's choice). Defaults per
sampler (`DEFAULTS`) are the measured best (README, "Fast sampling").

The paper's w everywhere; libraries that use a "scale" s (diffusers' guidance_scale, k-diffusion's
cfg_scale) have s = 1 + w. Deviation from the paper: x̃_t is clipped to [−1, 1] by default, as in DDPM
and ADM (the paper does not say); `clip_x=False` / `--no-clip` gives Algorithm 2 as written, and
`clip_x=p` / `--dynamic-threshold p` Imagen's dynamic thresholding at percentile p (`dynamic_threshold`).

Library: `guided_eps`, `sample`, the step functions, `dynamic_threshold`, `save_grid` (the library imports only
schedule.py and model.py from the project, so the three files lift out together; the command line also imports
guidance.py, classifier.py and fast_cpu.py, each where it is needed). Command line:

    python sample.py --ckpt out/mnist/ckpt.pt --w 0 0.5 1 2 4 --classes 0-9 --n-per-class 8 \
        --sampler ancestral --steps 256 --v 0.3 --seed 0 --out samples.png --npz samples.npz
    python sample.py --ckpt out/mnist/ckpt.pt --sampler dpmpp2m-sde      # few steps (24)
    python sample.py --ckpt out/mnist/ckpt.pt --guidance classifier --classifier-ckpt out/classifier-noisy/mnist/ckpt.pt
    python sample.py --ckpt out/mnist/ckpt.pt --guidance apg --w 0 2 4 8   # or interval, autoguidance, rescale, cfgpp
    torchrun --nproc_per_node=4 sample.py --ckpt ... --npz samples.npz   # images split across processes
"""
import argparse
import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from tqdm import tqdm

import model as model_lib
import schedule

# Per sampler: the λ spacing and the number of steps T when none is given (measured: README, "Fast sampling").
DEFAULTS = {"ancestral": dict(spacing="cosine", steps=256),  # the paper's T = 256
            "ddim": dict(spacing="cosine", steps=256),
            "dpmpp2m": dict(spacing="uniform", steps=24),
            "dpmpp2m-sde": dict(spacing="uniform", steps=24)}
FAST_SAMPLER = "dpmpp2m-sde"  # the few-step choice, guided and unguided (README, "Fast sampling")


# ------------------------------------------------------------------ line 3: the guidance rule

def cond_and_uncond_eps(model, z, logsnr, labels):
    """(ε_θ(z, c), ε_θ(z, ∅)): the two evaluations share z and run as one batch of 2B."""
    null = torch.full_like(labels, model.null_label)  # ∅
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    return model(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null])).chunk(2)


def guided_eps(model, z, logsnr, labels, w):
    """Classifier-free guidance (Alg. 2, line 3): ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z, ∅).

    w: a number, or (B,) with one w per example. The two evaluations share z and run as one batch
    of 2B; only the conditional pass runs when w = 0 everywhere."""
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    if not w.any():  # w = 0 everywhere: no guidance, only the conditional pass
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    if w.ndim == 1:
        w = w.reshape(-1, *[1] * (z.ndim - 1))  # (B,) -> (B, 1, 1, 1)
    return (1 + w) * eps_cond - w * eps_uncond


# ------------------------------------------------------------------ line 5: the step from λ to λ′ > λ

def ancestral_step(z, x, logsnr, logsnr_next, v, noise):
    """Alg. 2, line 5: z′ = μ̃_{λ′|λ}(z, x̃) + ((σ̃²_{λ′|λ})^{1−v} (σ²_{λ|λ′})^v)^{1/2} · noise, noise ~ N(0, I)."""
    mean, _ = schedule.q_posterior(z, x, logsnr, logsnr_next)
    return mean + schedule.reverse_variance(logsnr, logsnr_next, v).sqrt() * noise


def ddim_step(z, x, logsnr, logsnr_next, eps=None):
    """DDIM (η = 0) from λ to λ′ (numbers): z′ = α_λ′ x̃ + σ_λ′ ε̂, where ε̂ = (z − α_λ x̃)/σ_λ goes with x̃.

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


def dpmpp2m_step(z, x, logsnr, logsnr_next, x_prev=None, logsnr_prev=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, in the paper's λ:
    the DDIM step with x̃ replaced by D (`extrapolate_x`). The probability-flow ODE, deterministic."""
    return ddim_step(z, extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next), logsnr, logsnr_next)


def dpmpp2m_sde_step(z, x, logsnr, logsnr_next, noise, x_prev=None, logsnr_prev=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; k-diffusion's dpmpp_2m_sde, η = 1), in the paper's λ:
    z′ = (σ_λ′/σ_λ) e^{−h} z + α_λ′ (1 − e^{−2h}) D + σ_λ′ (1 − e^{−2h})^{1/2} · noise, h = (λ′ − λ)/2.

    That is Algorithm 2's line 5 with v = 0 (mean μ̃_{λ′|λ}(z, D), variance σ̃²_{λ′|λ} = σ²_λ′ (1 − e^{λ−λ′})) and
    x̃ replaced by D (`extrapolate_x`): the paper's ancestral sampler made second order. It samples the reverse
    SDE, whose fresh noise corrects the network's errors where the ODE carries them (README, "Fast sampling")."""
    return ancestral_step(z, extrapolate_x(x, x_prev, logsnr_prev, logsnr, logsnr_next), logsnr, logsnr_next, 0.0,
                          noise)


# ------------------------------------------------------------------ line 4: x̃ kept in the data range

def dynamic_threshold(x, p):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample: s = max(1, the p-quantile of |x̃|
    over the sample's pixels), x̃ ← clip(x̃, −s, s) / s. Where s = 1 it is the fixed clip to [−1, 1]."""
    s = torch.quantile(x.abs().flatten(1), p, dim=1).clamp(min=1)  # (B,), linear interpolation as numpy's percentile
    s = s.reshape(-1, *[1] * (x.ndim - 1))  # (B,) -> (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x, s), -s) / s


# ------------------------------------------------------------------ the loop, written once

def logsnr_steps(steps, spacing="cosine"):
    """λ_1 = λ_min < … < λ_T = λ_max (float64, (T,)): a schedule at evenly spaced u from 1 to 0."""
    u = torch.linspace(1, 0, steps, dtype=torch.float64)
    if spacing == "cosine":
        return schedule.logsnr_cosine(u)
    if spacing == "uniform":
        return schedule.logsnr_uniform(u)
    raise ValueError(f"unknown spacing {spacing!r}: use 'cosine' or 'uniform'")


def _randn(shape, generator, device):
    """N(0, I) of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else device).to(device)


@torch.no_grad()
def sample(model, labels, w, steps=None, sampler="ancestral", spacing=None, v=0.3, clip_x=True,
           guidance=guided_eps, shape=None, generator=None, progress=None):
    """Algorithm 2 with the given step (one of DEFAULTS) and guidance rule: one sample x̃ per label.

    labels: (B,) long, on the device to sample on. w: a number or a (B,) tensor. steps, spacing: T and
    the λ spacing, by default DEFAULTS[sampler]. clip_x: True clips x̃ to [−1, 1], False leaves it (the paper),
    a float p in (0, 1] applies Imagen's dynamic thresholding at percentile p instead (`dynamic_threshold`).
    guidance: the rule of line 3; it returns ε̃, or a pair (ε̃, ε to re-noise with) that only the ddim step takes
    (CFG++, guidance.py). shape: one sample's shape, (C, H, W) from model.config by default. generator: a
    torch.Generator, or a list of B of them (row i then depends on generator i alone, whatever else is in the
    batch). progress: True for a tqdm bar, or a callable progress(t, T) run after each step. Returns (B, *shape)
    float32.
    """
    if sampler not in DEFAULTS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(DEFAULTS)}")
    steps = steps or DEFAULTS[sampler]["steps"]
    if steps < 1 or not 0 <= v <= 1:
        raise ValueError(f"need steps >= 1 and 0 <= v <= 1, got {steps} and {v}")
    if not (isinstance(clip_x, bool) or isinstance(clip_x, float) and 0 < clip_x <= 1):
        raise ValueError(f"clip_x must be True, False or a percentile p in (0, 1] (dynamic thresholding), "
                         f"got {clip_x!r}")
    if shape is None:
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    B, device = len(labels), labels.device
    logsnrs = logsnr_steps(steps, spacing or DEFAULTS[sampler]["spacing"]).tolist()  # λ_1 < … < λ_T
    bar = tqdm(total=steps, desc="sampling", leave=False) if progress is True else None
    if bar is not None:
        progress = lambda t, T: bar.update(1)

    z = _randn((B, *shape), generator, device)  # Alg. 2, line 1
    x_prev = None
    for t in range(steps):  # Alg. 2, line 2
        logsnr = torch.full((B,), logsnrs[t], device=device)  # λ_t, (B,)
        eps = guidance(model, z, logsnr, labels, w)  # Alg. 2, line 3
        eps, eps_renoise = eps if isinstance(eps, tuple) else (eps, None)  # a pair: CFG++ re-noises with its own ε
        if eps_renoise is not None and sampler != "ddim":
            raise ValueError(f"this guidance rule re-noises with its own ε (CFG++), which only sampler 'ddim' takes, "
                             f"not {sampler!r}")
        x = schedule.predict_x(z, eps, logsnr)  # Alg. 2, line 4
        if clip_x is True:
            # Deviation from the paper: x̃ is clipped to the data range [−1, 1] (as in DDPM and ADM); the
            # paper does not say. Without it, large w pushes x̃ far outside the data range. --no-clip for the paper.
            x = x.clamp(-1, 1)
        elif clip_x:  # a percentile p: Imagen's dynamic thresholding in place of the fixed clip
            x = dynamic_threshold(x, clip_x)
        if progress:
            progress(t + 1, steps)
        if t == steps - 1:
            break  # Alg. 2, line 5: z_{T+1} = x̃_T
        if sampler == "ancestral":  # Alg. 2, line 5
            z = ancestral_step(z, x, logsnrs[t], logsnrs[t + 1], v, _randn(z.shape, generator, device))
        elif sampler == "ddim":
            z = ddim_step(z, x, logsnrs[t], logsnrs[t + 1], eps_renoise)
        elif sampler == "dpmpp2m":
            z = dpmpp2m_step(z, x, logsnrs[t], logsnrs[t + 1], x_prev, logsnrs[t - 1] if t else None)
        else:  # dpmpp2m-sde
            noise = _randn(z.shape, generator, device)
            z = dpmpp2m_sde_step(z, x, logsnrs[t], logsnrs[t + 1], noise, x_prev, logsnrs[t - 1] if t else None)
        x_prev = x
    if bar is not None:
        bar.close()
    return x  # Alg. 2, line 7


def save_grid(images, path, row_labels, col_labels, title=None):
    """Write images (rows, cols, n, C, H, W) in [−1, 1] as one labelled PNG: n samples side by side per cell."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (EMA weights are used)")
    p.add_argument("--w", type=float, nargs="+",
                   help="guidance strengths, the paper's w (0 = no guidance; default 0 0.5 1 2 4)")
    p.add_argument("--classes", default="all", help="'all', a range '0-9' or a list '3,5,7'")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--sampler", choices=list(DEFAULTS), help="the step of line 5 (default ancestral, the paper's; "
                   "ddim with --guidance cfgpp)")
    p.add_argument("--steps", type=int, help="T (default per sampler: " +
                   ", ".join(f"{k} {d['steps']}" for k, d in DEFAULTS.items()) + "; paper: 256)")
    p.add_argument("--spacing", choices=["cosine", "uniform"],
                   help="λ_t at evenly spaced u of the cosine schedule, or evenly spaced λ (default per sampler: " +
                   ", ".join(f"{k} {d['spacing']}" for k, d in DEFAULTS.items()) + ")")
    p.add_argument("--v", type=float, default=0.3, help="variance interpolation of the ancestral step (paper: 0.3)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction,
                   help="clip x̃ to [-1, 1] (default; a deviation: the paper does not say)")
    p.add_argument("--dynamic-threshold", type=float, metavar="P", help="instead of the fixed clip, Imagen's "
                   "dynamic thresholding: per image s = max(1, the P-quantile of |x̃|), x̃ <- clip(x̃, -s, s)/s "
                   "(Imagen: 0.995)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write uint8 images (N, H, W, C), labels and w")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (per process)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--guidance", choices=["cfg", "classifier", "interval", "autoguidance", "rescale", "apg", "cfgpp"],
                   default="cfg", help="line 3's rule, on the paper's w axis: cfg, ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z) "
                   "(the paper's); classifier guidance with a noise-conditional classifier p_φ (classifier.py); or a "
                   "rule after the paper (guidance.py): CFG in a λ interval, autoguidance by a worse model, CFG "
                   "rescale, adaptive projected guidance, CFG++ (ddim)")
    p.add_argument("--classifier-ckpt", help="with --guidance classifier: a checkpoint written by classifier.py "
                   "for the diffusion checkpoint's dataset")
    p.add_argument("--classifier-base", choices=["uncond", "cond"],
                   help="with --guidance classifier: uncond (default), ε̂ = ε_θ(z) − (1 + w) σ ∇ log p_φ(c|z) "
                   "(Dhariwal & Nichol's scale s = 1 + w); cond, ε̂ = ε_θ(z, c) − w σ ∇ log p_φ(c|z)")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="with --guidance interval: guide only for LO <= λ <= HI (default guidance.INTERVAL: "
                   "Kynkäänniemi et al.'s EDM2-XXL interval σ in [0.28, 1.61] on SD-VAE latents as λ = -2 log σ; "
                   "measured for mnist-4k in notebook 05: -4 0)")
    p.add_argument("--guide-ckpt", help="with --guidance autoguidance: the bad model ε_bad(z, c), a checkpoint of "
                   "train.py for the same data (an early checkpoint of the same run, or a smaller preset trained "
                   "briefly)")
    p.add_argument("--rescale-phi", type=float, help="with --guidance rescale: φ in [0, 1] (default "
                   "guidance.RESCALE_PHI, Lin et al.'s 0.7)")
    p.add_argument("--apg-eta", type=float, help="with --guidance apg: weight η in [0, 1] of the part of the "
                   "guidance difference parallel to x̂_c (default guidance.APG_ETA, Sadat et al.'s 0)")
    p.add_argument("--apg-r", type=float, help="with --guidance apg: norm threshold r > 0 of the difference, inf "
                   "for none (default guidance.APG_R; it depends on the image size: to be measured)")
    p.add_argument("--apg-beta", type=float, help="with --guidance apg: momentum β in (-1, 1) (default "
                   "guidance.APG_BETA, negative: reverse momentum)")
    p.add_argument("--cfgpp-gamma", type=float, nargs="+", metavar="GAMMA",
                   help="with --guidance cfgpp, in place of --w: CFG++'s guidance scales γ in [0, 1], one row each, "
                   "run at w = γ - 1 (default guidance.CFGPP_GAMMAS)")

    def fail(message):  # one line on stderr (rank 0 only), exit code 2, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"sample.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    p.error = fail
    args = p.parse_args(argv)

    # Each rule's flags go with that rule only; the chosen rule's defaults are guidance.py's (the papers' values, or
    # marked there as to be measured).
    rule_flags = {"classifier": ["--classifier-ckpt", "--classifier-base"], "interval": ["--interval"],
                  "autoguidance": ["--guide-ckpt"], "rescale": ["--rescale-phi"],
                  "apg": ["--apg-eta", "--apg-r", "--apg-beta"], "cfgpp": ["--cfgpp-gamma"]}
    for rule, flags in rule_flags.items():
        if args.guidance != rule and any(getattr(args, f[2:].replace("-", "_")) is not None for f in flags):
            fail(f"{' and '.join(flags)} {'go' if len(flags) > 1 else 'goes'} with --guidance {rule}")
    if args.guidance not in ("cfg", "classifier"):
        import guidance as guidance_lib  # imported here: the library functions above need only schedule and model
        for name, default in [("interval", list(guidance_lib.INTERVAL)), ("rescale_phi", guidance_lib.RESCALE_PHI),
                              ("apg_eta", guidance_lib.APG_ETA), ("apg_r", guidance_lib.APG_R),
                              ("apg_beta", guidance_lib.APG_BETA), ("cfgpp_gamma", list(guidance_lib.CFGPP_GAMMAS))]:
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.guidance == "cfgpp":  # CFG++'s rows are its scales γ = 1 + w, on the DDIM step
        if args.w is not None:
            fail("--guidance cfgpp takes its strengths as --cfgpp-gamma (γ = 1 + w in [0, 1]), not --w")
        if args.sampler not in (None, "ddim"):
            fail(f"--guidance cfgpp is defined on the DDIM step: use --sampler ddim, not {args.sampler}")
        if not all(0 <= g <= 1 for g in args.cfgpp_gamma):
            fail(f"--cfgpp-gamma {args.cfgpp_gamma} must lie in [0, 1] (CFG++'s range)")
        args.sampler, args.w = "ddim", [g - 1 for g in args.cfgpp_gamma]
    if args.guidance == "interval" and not (all(map(math.isfinite, args.interval))
                                            and args.interval[0] < args.interval[1]):
        fail(f"--interval {args.interval[0]} {args.interval[1]} must be two finite λ with LO < HI")
    if args.guidance == "rescale" and not 0 <= args.rescale_phi <= 1:
        fail(f"--rescale-phi {args.rescale_phi} is outside [0, 1] (Lin et al.: 0.7)")
    if args.guidance == "apg":
        if not 0 <= args.apg_eta <= 1:
            fail(f"--apg-eta {args.apg_eta} is outside [0, 1] (Sadat et al.: 0)")
        if not args.apg_r > 0:
            fail(f"--apg-r {args.apg_r} must be positive (inf: no threshold)")
        if not -1 < args.apg_beta < 1:
            fail(f"--apg-beta {args.apg_beta} is outside (-1, 1)")
    args.w = args.w or [0.0, 0.5, 1.0, 2.0, 4.0]
    args.sampler = args.sampler or "ancestral"
    args.steps = args.steps if args.steps is not None else DEFAULTS[args.sampler]["steps"]
    args.spacing = args.spacing or DEFAULTS[args.sampler]["spacing"]

    if args.steps < 1 or args.n_per_class < 1 or args.batch_size < 1:
        fail("--steps, --n-per-class and --batch-size must be at least 1")
    if not 0 <= args.v <= 1:
        fail(f"--v {args.v} is outside [0, 1] (paper: 0.3)")
    if not all(math.isfinite(w) for w in args.w):
        fail(f"--w {args.w} must be finite numbers")
    if args.dynamic_threshold is not None:
        if args.clip is not None:
            fail("--dynamic-threshold replaces the fixed clip: give it without --clip / --no-clip")
        if not 0 < args.dynamic_threshold <= 1:
            fail(f"--dynamic-threshold {args.dynamic_threshold} must lie in (0, 1] (a percentile; Imagen: 0.995)")
    clip_x = args.dynamic_threshold if args.dynamic_threshold is not None else args.clip is not False
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available; use --device cpu")
    if args.guidance == "classifier" and not args.classifier_ckpt:
        fail("--guidance classifier needs --classifier-ckpt (a checkpoint written by classifier.py)")
    if args.guidance == "autoguidance" and not args.guide_ckpt:
        fail("--guidance autoguidance needs --guide-ckpt (a worse model of the same data, written by train.py)")
    for path in filter(None, [args.out, args.npz]):  # fail now, not after sampling
        try:
            open(f"{path}.tmp{os.getpid()}", "wb").close()
            os.remove(f"{path}.tmp{os.getpid()}")
        except OSError as e:
            fail(f"cannot write {path}: {e.strerror}")
    if args.device == "cpu":
        import fast_cpu  # imported here: the library functions above work without it
        fast_cpu.keep_freed_memory()  # a CPU speed setting for sampling (fast_cpu.py)

    def load_unet(path, flag=""):
        try:
            ckpt = model_lib.load_checkpoint(path)
            return ckpt, model_lib.model_from_checkpoint(ckpt, "ema").to(args.device).eval()
        except model_lib.CheckpointError as e:
            fail(flag + str(e))
        except (RuntimeError, KeyError, TypeError) as e:  # a config that does not match its weights
            fail(f"{flag}{path}: the stored weights do not fit the stored config ({type(e).__name__})")
    ckpt, model = load_unet(args.ckpt)
    try:
        classes = parse_classes(args.classes, model.config.num_classes)
    except ValueError as e:
        fail(f"--classes {args.classes!r}: {e}")
    dataset = ckpt.get("args", {}).get("dataset", "")

    def check_same_data(flag, path, their_dataset, config, hint):
        """A classifier or guide model must be of the diffusion model's data: same dataset, image shape, classes."""
        for what, theirs, ours in [("dataset", their_dataset, dataset),  # unchecked where a checkpoint does not say
                                   ("image size", config.image_size, model.config.image_size),
                                   ("channels", config.in_channels, model.config.in_channels),
                                   ("number of classes", config.num_classes, model.config.num_classes)]:
            if theirs != ours and theirs != "" and ours != "":
                fail(f"{flag} {path} has {what} {theirs!r} but --ckpt {args.ckpt} has {ours!r}: {hint}")

    # Line 3's rule: CFG (guided_eps), classifier guidance with p_φ bound into classifier.classifier_guided_eps, or
    # a rule of guidance.py with its parameters bound. make_guidance() gives the rule for one batch: a fresh APG
    # each time, so no momentum carries over from one sampling run to the next.
    guidance, classifier, guide, described = guided_eps, None, None, ""
    if args.guidance == "classifier":
        import classifier as classifier_lib  # imported here: the library functions above need only schedule and model
        try:
            classifier, classifier_ckpt = classifier_lib.load_classifier(args.classifier_ckpt)
        except model_lib.CheckpointError as e:
            fail(f"--classifier-ckpt: {e}")
        check_same_data("--classifier-ckpt", args.classifier_ckpt, classifier_ckpt.get("args", {}).get("dataset", ""),
                        classifier.config, "train a classifier on the same data "
                        f"(python classifier.py --dataset {dataset or '...'})")
        classifier.to(args.device)  # in place: the rule below holds this module
        args.classifier_base = args.classifier_base or "uncond"
        guidance = functools.partial(classifier_lib.classifier_guided_eps, classifier=classifier,
                                     base=args.classifier_base)
        described = f", classifier guidance ({args.classifier_base} base)"
    elif args.guidance == "interval":
        guidance = functools.partial(guidance_lib.interval_guided_eps, logsnr_lo=args.interval[0],
                                     logsnr_hi=args.interval[1])
        described = f", CFG for λ in [{args.interval[0]:.2f}, {args.interval[1]:.2f}]"
    elif args.guidance == "autoguidance":
        guide_ckpt, guide = load_unet(args.guide_ckpt, "--guide-ckpt: ")
        check_same_data("--guide-ckpt", args.guide_ckpt, guide_ckpt.get("args", {}).get("dataset", ""), guide.config,
                        "the bad model must be trained on the same data and classes")
        guidance = functools.partial(guidance_lib.autoguided_eps, guide=guide)
        described = f", autoguidance by {os.path.basename(args.guide_ckpt)} (step {guide_ckpt.get('step', '?')})"
    elif args.guidance == "rescale":
        guidance = functools.partial(guidance_lib.rescaled_guided_eps, phi=args.rescale_phi)
        described = f", CFG rescale φ = {args.rescale_phi:g}"
    elif args.guidance == "cfgpp":
        guidance, described = guidance_lib.cfgpp_eps, ", CFG++"
    elif args.guidance == "apg":
        described = f", APG η = {args.apg_eta:g}, r = {args.apg_r:g}, β = {args.apg_beta:g}"
    make_guidance = (lambda: guidance_lib.APG(args.apg_eta, args.apg_r, args.apg_beta)) if args.guidance == "apg" \
        else (lambda: guidance)

    # Under torchrun the images are split across the processes by index; rank 0 gathers and writes them.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            model = model.to(device)
            for net in filter(None, [classifier, guide]):
                net.to(device)  # in place: the guidance rule holds this module
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
    bar = tqdm(total=len(batches) * args.steps, desc=f"{len(grid)} images", disable=None if rank == 0 else True)
    start, images = time.time(), {}  # image index -> uint8 (C, H, W)
    for batch in batches:
        generators = [torch.Generator().manual_seed(seeds[i]) for i in batch]
        x = sample(model, labels[batch].to(device), ws[batch].to(device), args.steps, args.sampler, args.spacing,
                   args.v, clip_x, make_guidance(), generator=generators, progress=lambda t, T: bar.update(1))
        images.update(zip(batch, to_uint8(x).cpu()))
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

    title = (f"{dataset} {args.sampler}, T = {args.steps}, {args.spacing} spacing"
             + (f", v = {args.v}" if args.sampler == "ancestral" else "")
             + described + (f", dynamic threshold p = {clip_x:g}" if clip_x is not True and clip_x else ""))
    rows = [f"γ = {1 + w:g}" if args.guidance == "cfgpp" else f"w = {w:g}" for w in args.w]  # CFG++: γ = 1 + w
    try:
        save_grid(images.float().reshape(len(args.w), len(classes), args.n_per_class, *images.shape[1:]) / 127.5 - 1,
                  args.out, rows, [str(c) for c in classes], title)
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

"""Guided sampling of Classifier-Free Diffusion Guidance: Algorithm 2, exactly, plus DDIM.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Algorithm 2, with an
increasing log-SNR sequence λ_1 = λ_min < … < λ_T = λ_max (the cosine schedule at evenly spaced
u from 1 to 0) and guidance strength w (w = 0: the conditional model; w = −1: the unconditional):

    1: z_1 ~ N(0, I)
    2: for t = 1, …, T:
    3:     ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)         (both in one batch of 2B)
    4:     x̃_t = (z_t − σ_λt ε̃_t) / α_λt
    5:     z_{t+1} ~ N(μ̃_{λt+1|λt}(z_t, x̃_t), (σ̃²_{λt+1|λt})^{1−v} (σ²_{λt|λt+1})^v)  if t < T,  else z_{t+1} = x̃_t
    7: return z_{T+1}

`sampler="ddim"` replaces line 5 by the deterministic DDIM step z_{t+1} = α_λt+1 x̃_t + σ_λt+1 ε̂_t
(the paper: "could be replaced by another sampler, e.g. DDIM"). The paper's w everywhere; libraries
that use a "scale" s (diffusers' guidance_scale, k-diffusion's cfg_scale) have s = 1 + w.
Deviation from the paper: x̃_t is clipped to [−1, 1] by default, as in DDPM and ADM (the paper does
not say); `clip_x=False` / `--no-clip` gives Algorithm 2 as written.

Library: `guided_eps`, `sample`, `save_grid` (pure functions; this file imports only schedule.py
and model.py from the project, so the three files lift out together). Command line:

    python sample.py --ckpt out/mnist/ckpt.pt --w 0 0.5 1 2 4 --classes 0-9 --n-per-class 8 \
        --steps 256 --v 0.3 --sampler ancestral --seed 0 --out samples.png --npz samples.npz
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import model as model_lib
import schedule


def guided_eps(model, z, logsnr, labels, w, one_batch=True):
    """Classifier-free guidance (Alg. 2, line 3): ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z, ∅).

    The two evaluations run as one batch of 2B (one_batch=True), or as two passes of B
    (one_batch=False: half the activation memory, at about the same speed on a CPU; bench.py
    measures both). Only the conditional pass when w = 0 everywhere."""
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)  # scalar, or (B,): one w per example
    if not w.any():  # w = 0 everywhere: no guidance, only the conditional pass
        return model(z, logsnr, labels)
    null = torch.full_like(labels, model.null_label)  # ∅
    if one_batch:
        logsnr = torch.as_tensor(logsnr)
        if logsnr.ndim == 1:
            logsnr = torch.cat([logsnr, logsnr])  # (2B,)
        eps_cond, eps_uncond = model(torch.cat([z, z]), logsnr, torch.cat([labels, null])).chunk(2)
    else:
        eps_cond, eps_uncond = model(z, logsnr, labels), model(z, logsnr, null)
    if w.ndim == 1:
        w = w.reshape(-1, *[1] * (z.ndim - 1))  # (B,) -> (B, 1, 1, 1)
    return (1 + w) * eps_cond - w * eps_uncond


def _randn(shape, generator, device):
    """N(0, I) of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else device).to(device)


@torch.no_grad()
def sample(model, labels, w, steps=256, v=0.3, sampler="ancestral", clip_x=True, shape=None,
           generator=None, progress=None, one_batch=True):
    """Algorithm 2 (ancestral, variance blend v) or DDIM: one sample x̃ per label, guided with strength w.

    labels: (B,) long, on the device to sample on. w: a number or a (B,) tensor. shape: one sample's
    shape, (C, H, W) from model.config by default. generator: a torch.Generator, or a list of B of
    them (row i then depends on generator i alone, whatever else is in the batch). progress: True
    for a tqdm bar, or a callable progress(t, T) run after each step. one_batch: see guided_eps.
    Returns (B, *shape) float32.
    """
    if steps < 1 or not 0 <= v <= 1 or sampler not in ("ancestral", "ddim"):
        raise ValueError(f"need steps >= 1, 0 <= v <= 1 and sampler ancestral|ddim, got {steps}, {v}, {sampler!r}")
    if shape is None:
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    B, device = len(labels), labels.device
    # λ_1 = λ_min < … < λ_T = λ_max: the cosine schedule at evenly spaced u from 1 to 0.
    logsnrs = schedule.logsnr_cosine(torch.linspace(1, 0, steps, dtype=torch.float64))  # float64
    bar = tqdm(total=steps, desc="sampling", leave=False) if progress is True else None
    if bar is not None:
        progress = lambda t, T: bar.update(1)

    z = _randn((B, *shape), generator, device)  # Alg. 2, line 1
    for t in range(steps):  # Alg. 2, line 2
        logsnr = torch.full((B,), logsnrs[t].item(), device=device)  # λ_t, (B,)
        eps = guided_eps(model, z, logsnr, labels, w, one_batch)  # Alg. 2, line 3
        x = schedule.predict_x(z, eps, logsnr)  # Alg. 2, line 4
        if clip_x:
            # Deviation from the paper: x̃ is clipped to the data range [−1, 1] (as in DDPM and ADM); the
            # paper does not say. Without it, large w pushes x̃ far outside the data range. --no-clip for the paper.
            x = x.clamp(-1, 1)
        if progress:
            progress(t + 1, steps)
        if t == steps - 1:
            break  # Alg. 2, line 5: z_{T+1} = x̃_T
        logsnr_next = torch.full((B,), logsnrs[t + 1].item(), device=device)  # λ_{t+1}
        if sampler == "ancestral":
            mean, _ = schedule.q_posterior(z, x, logsnr, logsnr_next)  # μ̃_{λt+1|λt}(z_t, x̃_t)
            var = schedule.reverse_variance(logsnrs[t], logsnrs[t + 1], v)  # (σ̃²)^{1−v} (σ²)^v
            z = mean + var.sqrt().item() * _randn(z.shape, generator, device)  # Alg. 2, line 5
        else:
            eps_hat = schedule.predict_eps(z, x, logsnr)  # ε̂ consistent with the (clipped) x̃
            z = schedule.q_sample(x, logsnr_next, eps_hat)  # DDIM: z_{t+1} = α_{t+1} x̃_t + σ_{t+1} ε̂_t
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
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                   help="guidance strengths, the paper's w (0 = no guidance)")
    p.add_argument("--classes", default="all", help="'all', a range '0-9' or a list '3,5,7'")
    p.add_argument("--n-per-class", type=int, default=8)
    p.add_argument("--steps", type=int, default=256, help="T (paper: 256)")
    p.add_argument("--v", type=float, default=0.3, help="variance interpolation (paper: 0.3 at 64x64)")
    p.add_argument("--sampler", choices=["ancestral", "ddim"], default="ancestral")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clip x̃ to [-1, 1] (default; a deviation: the paper does not say)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write uint8 images (N, H, W, C), labels and w")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    def fail(message):  # one line on stderr, exit code 2, no traceback
        print(f"sample.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    p.error = fail
    args = p.parse_args(argv)

    if args.steps < 1 or args.n_per_class < 1 or args.batch_size < 1:
        fail("--steps, --n-per-class and --batch-size must be at least 1")
    if not 0 <= args.v <= 1:
        fail(f"--v {args.v} is outside [0, 1] (paper: 0.3)")
    if not all(math.isfinite(w) for w in args.w):
        fail(f"--w {args.w} must be finite numbers")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available; use --device cpu")
    for path in filter(None, [args.out, args.npz]):  # fail now, not after sampling
        try:
            open(f"{path}.tmp{os.getpid()}", "wb").close()
            os.remove(f"{path}.tmp{os.getpid()}")
        except OSError as e:
            fail(f"cannot write {path}: {e.strerror}")
    try:
        ckpt = model_lib.load_checkpoint(args.ckpt)
        model = model_lib.model_from_checkpoint(ckpt, "ema").to(args.device).eval()
        if args.device == "cpu":
            model = model_lib.speed_up_cpu(model)  # channels_last, and malloc keeps freed memory
    except model_lib.CheckpointError as e:
        fail(str(e))
    except (RuntimeError, KeyError, TypeError) as e:  # a config that does not match its weights
        fail(f"{args.ckpt}: the stored weights do not fit the stored config ({type(e).__name__})")
    try:
        classes = parse_classes(args.classes, model.config.num_classes)
    except ValueError as e:
        fail(f"--classes {args.classes!r}: {e}")

    # Every image is (w, class, j). Its noise comes from its own generator seeded by (seed, class, j):
    # the same seed gives the same images whatever --batch-size, and every w row starts from the same noise.
    torch.manual_seed(args.seed)
    grid = [(w, c, j) for w in args.w for c in classes for j in range(args.n_per_class)]
    ws = torch.tensor([w for w, _, _ in grid])
    labels = torch.tensor([c for _, c, _ in grid])
    seeds = [int(np.random.SeedSequence([args.seed, c, j]).generate_state(1)[0]) for _, c, j in grid]
    batches = range(0, len(grid), args.batch_size)
    bar = tqdm(total=len(batches) * args.steps, desc=f"{len(grid)} images", disable=None)
    start, images = time.time(), []
    for i in batches:
        chunk = slice(i, i + args.batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        x = sample(model, labels[chunk].to(args.device), ws[chunk].to(args.device), args.steps, args.v,
                   args.sampler, args.clip, generator=generators, progress=lambda t, T: bar.update(1))
        images.append(x.cpu())  # (b, C, H, W)
    bar.close()
    images = torch.cat(images)  # (N, C, H, W)

    dataset = ckpt.get("args", {}).get("dataset", "")
    title = f"{dataset} {args.sampler}, T = {args.steps}" + (f", v = {args.v}" if args.sampler == "ancestral" else "")
    try:
        save_grid(images.reshape(len(args.w), len(classes), args.n_per_class, *images.shape[1:]), args.out,
                  [f"w = {w:g}" for w in args.w], [str(c) for c in classes], title)
        if args.npz:
            tmp = f"{args.npz}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.savez(f, images=to_uint8(images).permute(0, 2, 3, 1).numpy(),  # (N, H, W, C)
                         labels=labels.numpy(), w=ws.numpy())
            os.replace(tmp, args.npz)
    except OSError as e:
        fail(f"cannot write the output: {e}")
    print(f"{len(grid)} images in {time.time() - start:.1f} s -> {args.out}" + (f", {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()

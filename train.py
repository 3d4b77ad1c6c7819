"""Joint training of a conditional and an unconditional diffusion model: Algorithm 1, on real data.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598). One network ε_θ learns both
ε_θ(z_λ, c) and ε_θ(z_λ) = ε_θ(z_λ, ∅), because the label is dropped to the null label ∅ at random:

    Algorithm 1: joint training
    1: repeat
    2:   (x, c) ~ p(x, c)                          a minibatch of images in [−1, 1] and their labels
    3:   c ← ∅ with probability p_uncond           per example                     (drop_labels)
    4:   λ ~ p(λ)                                  λ = −2 log tan(a u + b), u ~ U(0, 1)   (sample_logsnr)
    5:   ε ~ N(0, I)
    6:   z_λ = α_λ x + σ_λ ε
    7:   take a gradient step on ∇_θ ‖ε_θ(z_λ, c) − ε‖²                          (diffusion_loss)
    8: until converged

`drop_labels`, `sample_logsnr` and `diffusion_loss` are pure functions that work for any module with
forward(z, logsnr, labels). `train_step` is one step of the whole recipe (the loss, backward, gradient
clipping, Adam with learning-rate warm-up, the EMA of the weights that sample.py uses); bench.py and
notebook 00 call it with `parse_args(["--dataset", name])`, so they train exactly as this script does.
`main` is the rest of a run, top to bottom: settings, out-dir lock, resume check, data, model, loop, with
checkpoints that resume exactly, preview grids drawn by sample.py, and DistributedDataParallel under torchrun.

Randomness: every random number of step s on rank r (flips, ∅, λ, ε and the network's dropout)
comes from the global RNG seeded with (seed, s, r), and epoch e's data order from (seed, e). A
resumed run therefore redraws exactly what the interrupted one would have drawn, whatever
killed it (even kill -9): on a CPU it ends with the same weights as a run that never stopped.

    python train.py --dataset digits                    # offline 8x8 digits, a CPU minute or two
    python train.py --dataset mnist --data-dir ./data   # downloads the official files on first use
    python train.py --dataset cifar10 --amp --compile   # the DDPM CIFAR-10 recipe, one GPU
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --amp --compile
    python train.py --dataset digits --resume           # continue out/digits/ckpt.pt (same flags + --resume)
    python train.py --dataset imagefolder --data-dir DIR --image-size 32   # your own DIR/train/<class>/*.png|jpg
    python train.py --dataset mnist --data-dir DIR --guidance-free  # GFT's loss (gft_loss) in place of line 7

--dataset cifar10 reads the official archive or the same images as DIR/train/<class>/*.jpg (data.py).
--dataset imagefolder trains on a user's labelled images (data.py describes the layout), with the network
and recipe of --preset (default mnist, the CPU recipe) at --image-size (default the preset's), fitted to
the images' channels and classes (fit_config). A named dataset takes --preset too, if the preset is a
network for its image shape: then it trains that network with that preset's recipe (DATASET_DEFAULTS).

Outputs in --out-dir (default out/<dataset>): ckpt.pt (with the class names, `class_names`),
samples_<step>.png (rows w = 0, 1, 3; columns the classes; the same noise at every step), loss.png, and
train.lock, which a run holds for its whole life (an flock the OS releases however the process ends):
a second run on the same --out-dir stops at once with one line naming the first one's process.
"""
import argparse
import copy
import dataclasses
import fcntl
import glob
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from data import (
    DATASETS,
    HOLDOUT,
    IMAGE_FOLDER,
    DataError,
    class_names,
    load_dataset,
    split_holdout,
    to_model_range,
)
from model import PRESETS, CheckpointError, UNet, config_from_dict, load_checkpoint, save_checkpoint
from schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule, per_example, q_sample

SAMPLE_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py")
LOCK_FILE = "train.lock"  # in --out-dir: held by the run that writes there (lock_out_dir)

# Per-dataset defaults; any flag given on the command line wins.
DATASET_DEFAULTS = {
    # The DDPM CIFAR-10 recipe (Ho et al. 2020, appendix B), which the paper's U-Net setup follows:
    # Adam at 2e-4 with 5,000 warm-up steps, gradient clipping at 1.0, batch 128, EMA 0.9999, 800k steps.
    "cifar10": dict(batch_size=128, lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False,
                    max_steps=800_000, log_every=100, ckpt_every=5000, sample_every=20_000, sample_steps=256),
    # Deviation from the paper (CPU presets): a 5x larger learning rate, a short warm-up and an EMA whose
    # decay ramps up as min(0.9999, (1 + step) / (10 + step)), so that a run of minutes on a CPU already
    # gives good samples; preview grids use T = 64 sampling steps (sample.py's default stays T = 256).
    "digits": dict(batch_size=64, lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True,
                   max_steps=2000, log_every=50, ckpt_every=500, sample_every=500, sample_steps=64),
    # mnist (and fashion-mnist): the recipe search's choice (README, "A recipe for CPU minutes"): batch 64 at
    # lr 2e-3, 4,000 steps (its training time per machine: README, "Results measured here").
    "mnist": dict(batch_size=64, lr=2e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True,
                  max_steps=4000, log_every=100, ckpt_every=500, sample_every=1000, sample_steps=64),
}
DATASET_DEFAULTS["fashion-mnist"] = DATASET_DEFAULTS["mnist"]
# cifar10-cpu (--dataset cifar10 --preset cifar10-cpu): the CIFAR-10 recipe search's choice (docs/results.md,
# "A CPU recipe for CIFAR-10"): the mnist recipe at 32×32 colour, for 18,000 steps (its training time per
# machine: docs/results.md).
DATASET_DEFAULTS["cifar10-cpu"] = dict(DATASET_DEFAULTS["mnist"], max_steps=18000, sample_every=2000)
# A user's image folder: the network and recipe of --preset, mnist's unless given (minutes on a CPU).
DATASET_DEFAULTS[IMAGE_FOLDER] = dict(preset="mnist")
PREVIEW_W = ("0", "1", "3")  # rows of the preview grids: the paper's w (0 = no guidance)


# ------------------------------------------------------------------ Algorithm 1 (pure functions)

def drop_labels(labels, p_uncond, null_label, generator=None):
    """Alg. 1, line 3: each label independently becomes the null label ∅ with probability p_uncond."""
    drop_label = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond  # True: c ← ∅
    return torch.where(drop_label, torch.full_like(labels, null_label), labels)


def sample_logsnr(batch_size, schedule="cosine", generator=None, device=None):
    """Alg. 1, line 4: (B,) float32 λ ∈ [λ_min, λ_max] from u ~ U(0, 1).

    "cosine": λ = −2 log tan(a u + b), a hyperbolic-secant density ∝ sech(λ/2) truncated to [λ_min, λ_max]
    (the paper's choice); "uniform": λ uniform on [λ_min, λ_max].
    """
    u = torch.rand(batch_size, generator=generator, device=device)
    logsnr = logsnr_schedule(u, schedule)
    # tan(a u + b) in float32 can land a hair past λ_min as u → 1 (a u + b is then within 5e-5 of π/2).
    return logsnr.clamp(LOGSNR_MIN, LOGSNR_MAX)


def diffusion_loss(model, x, labels, null_label, p_uncond=0.1, schedule="cosine", generator=None):
    """Alg. 1, lines 3-7 for a batch x of shape (B, ...): the mean of (ε_θ(z_λ, c) − ε)² over all elements.

    Draws from `generator` (the global RNG if None), in this order: B uniforms for ∅, B uniforms for λ,
    then ε of x's shape.
    """
    labels = drop_labels(labels, p_uncond, null_label, generator)  # line 3
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # line 4, (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # line 5
    z = q_sample(x, logsnr, eps)  # line 6: z_λ = α_λ x + σ_λ ε
    eps_pred = model(z, logsnr, labels)  # ε_θ(z_λ, c)
    # line 7: ‖ε_θ − ε‖², averaged over pixels as well as the batch (DDPM's "simple" loss)
    return F.mse_loss(eps_pred.float(), eps)

# ------------------------------------------------------------------ guidance-free training (a deviation, off by default)

BETA_RANGE = (0.0, 1.0)  # β ~ U(0, 1): the authors' range (every w ≥ 0)


def sample_beta(batch_size, beta_min=BETA_RANGE[0], generator=None, device=None):
    """(B,) float32 β ~ U(β_min, 1): β = β_min + (1 − β_min) u, u ~ U(0, 1), one per example."""
    if not BETA_RANGE[0] <= beta_min <= BETA_RANGE[1]:
        raise ValueError(f"beta_min = {beta_min} is outside [0, 1] (GFT: 0, every w >= 0)")
    u = torch.rand(batch_size, generator=generator, device=device)
    return beta_min + (1 - beta_min) * u


def gft_loss(model, x, labels, null_label, p_uncond=0.1, schedule="cosine", generator=None, *,
             beta_min=BETA_RANGE[0]):
    """Guidance-free training, GFT (Chen et al. 2025, "Visual Generation Without Guidance", arXiv 2501.15420), in
    place of line 7 (train.py --guidance-free). Read CFG backwards with β = 1/(1 + w) ∈ (0, 1]:
    ε_θ(z, c) = β ε̃ + (1 − β) ε_θ(z, ∅). GFT learns ε̃ itself, a network ε_s(z, c, β) with β as an input
    (model.UNetConfig(strength_input=True)), through Algorithm 1's loss with the conditional model written as that mix:

        Algorithm 1 (diffusion_loss)              GFT (gft_loss)
        c ← ∅ with probability p_uncond            the same
        λ ~ p(λ), ε ~ N(0, I)                      the same, and β ~ U(β_min, 1) per example (sample_beta)
        z_λ = α_λ x + σ_λ ε                        the same
        ‖ε_θ(z_λ, c) − ε‖²                         ‖β ε_s(z_λ, c, β) + (1 − β) sg[ε_s(z_λ, ∅, 1)] − ε‖²

    sg is the stop-gradient. Given z_λ the loss is least where the mix is E[ε | z_λ, c] = ε*(z_λ, c), and the ∅
    examples make ε_s(z, ∅, 1) = ε*(z, ∅); so ε_s(z, c, β) = (1 + w) ε*(z, c) − w ε*(z, ∅) at w = 1/β − 1: CFG's ε̃
    at every w ≥ 0 in one evaluation (guidance.guidance_free_eps). The cost moves to training: one more forward
    pass per step, without a backward. Details as in the authors' code (github.com/thu-ml/GFT): sg[ε_s(z_λ, ∅, 1)]
    uses the current weights, label ∅ and β = 1, under no_grad and in eval mode (no dropout); an example whose label
    was dropped to ∅ is fed β = 1 but mixed with its drawn β, so its loss is Algorithm 1's with the gradient scaled
    by β.

    The arguments are diffusion_loss's; draws in its order (∅, λ, ε), then B uniforms for β, so the same generator
    gives the same c, z_λ and ε, and beta_min=1 (β ≡ 1) gives diffusion_loss's value.
    """
    labels = drop_labels(labels, p_uncond, null_label, generator)  # line 3
    drop_label = labels == null_label  # True: c = ∅ (fed β = 1)
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # line 4, (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # line 5
    z = q_sample(x, logsnr, eps)  # line 6: z_λ = α_λ x + σ_λ ε
    beta = sample_beta(x.shape[0], beta_min, generator, x.device)  # β ~ U(β_min, 1), (B,)

    # sg[ε_s(z_λ, ∅, 1)]: the unconditional model, current weights, no dropout, no gradient.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            eps_uncond = model(z, logsnr, torch.full_like(labels, null_label), strength=torch.ones_like(beta))
    finally:
        model.train(was_training)
    eps_sample = model(z, logsnr, labels, strength=torch.where(drop_label, 1.0, beta))  # ε_s(z_λ, c, β); ∅: β = 1
    beta = per_example(beta, x)  # (B,) -> (B, 1, 1, 1)
    eps_cond = beta * eps_sample + (1 - beta) * eps_uncond  # GFT's ε_θ(z_λ, c); eps_uncond carries no gradient
    return F.mse_loss(eps_cond.float(), eps)  # line 7, averaged over pixels and batch as diffusion_loss


# ------------------------------------------------------------------ one step of the training recipe

@torch.no_grad()
def update_ema(ema, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def train_step(model, ema, optimizer, x, labels, null_label, step, args):
    """One step (0-based `step`) of Algorithm 1 with DDPM's optimisation recipe; returns the detached loss.

    model: the network to call (possibly DDP-wrapped or compiled; its parameters are the trained ones).
    args: train.py's settings; reads p_uncond, logsnr_schedule, guidance_free (the loss), lr, warmup_steps,
    grad_clip, ema_decay, ema_warmup and amp (bfloat16 autocast, CUDA only).
    """
    for group in optimizer.param_groups:  # linear learning-rate warm-up (DDPM)
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
    loss_fn = gft_loss if args.guidance_free else diffusion_loss  # guidance-free training: gft_loss
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp and x.device.type == "cuda"):
        loss = loss_fn(model, x, labels, null_label, args.p_uncond, args.logsnr_schedule)  # Alg. 1, 3-7
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    # Deviation from DDPM for the CPU presets (ema_warmup): the decay ramps up, so early weights fade fast.
    decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
    update_ema(ema, model, decay)
    return loss.detach()


# ------------------------------------------------------------------ randomness and data order

def step_seed(seed, step, rank):
    """The seed of all random draws of one training step on one rank."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def epoch_permutation(n, seed, epoch):
    """The data order of one epoch: the same on every rank, a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(step_seed(seed, epoch, 2 ** 31))  # its own stream, apart from steps
    return torch.randperm(n, generator=generator)


def any_rank(flag, device):
    """True on every rank if `flag` is True on any rank (one all-reduce)."""
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ------------------------------------------------------------------ settings

def fail(message, prog="train.py"):
    """Bad input: one line on stderr (from rank 0 only), exit code 2, no traceback. classifier.py and bench.py
    report their errors through it too (sample.py has its own, so that it lifts out alone)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def number(kind, low, high=math.inf, low_inclusive=True, high_inclusive=False):
    """An argparse type: a finite `kind` (int or float) in the given range, else a one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        inside = ((value >= low if low_inclusive else value > low)
                  and (value <= high if high_inclusive else value < high))
        if math.isfinite(value) and inside:
            return value
        if high < math.inf:
            bounds = ("[" if low_inclusive else "(") + f"{low:g}, {high:g}" + ("]" if high_inclusive else ")")
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        positive = (low, low_inclusive) in ((0, False), (1, True))
        raise argparse.ArgumentTypeError(f"must be {'positive' if positive else f'{low:g} or more'}, got {text}")
    return parse


def parse_args(argv=None):
    """train.py's settings: the command line, then the per-dataset defaults for what it leaves out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Per-dataset defaults: " + "; ".join(
                                    f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                    for name, d in DATASET_DEFAULTS.items()))
    positive, count = number(int, 1), number(int, 0)
    p.add_argument("--dataset", default="digits", choices=DATASETS + (IMAGE_FOLDER,))
    p.add_argument("--data-dir", default="./data", help="where data.py finds or downloads the files (imagefolder: "
                   "the folder holding train/<class>/)")
    p.add_argument("--preset", choices=list(PRESETS), help="the model.PRESETS network and its per-dataset recipe "
                   "(default the dataset's own; imagefolder: mnist's); for a named dataset, one of its image shape")
    p.add_argument("--image-size", type=number(int, 8), help="imagefolder only: H = W the images are brought to "
                   "(default the preset's)")
    p.add_argument("--holdout", type=count, help="images per class left out of training, for the metrics' "
                   "real reference (data.split_holdout; per dataset: mnist 200, others 0)")
    p.add_argument("--out-dir", default=None, help="checkpoint, sample grids and loss curve (default out/<dataset>)")
    p.add_argument("--p-uncond", type=number(float, 0, 1, high_inclusive=True), default=0.1,
                   help="probability of ∅ (paper: 0.1; 0.2 was as good)")
    p.add_argument("--logsnr-schedule", choices=["cosine", "uniform"], default="cosine", help="p(λ) (paper: cosine)")
    p.add_argument("--guidance-free", action="store_true", help="guidance-free training (gft_loss, Chen et "
                   "al. 2025) in place of Algorithm 1's loss: the network takes a strength β and samples CFG's w = 1/β − 1 "
                   "in one evaluation (sample.py --guidance guidance-free); a deviation from the paper, off by default")
    p.add_argument("--max-steps", type=positive, help="training steps (per dataset)")
    p.add_argument("--batch-size", type=positive, help="global batch, split across ranks (per dataset)")
    p.add_argument("--lr", type=number(float, 0, low_inclusive=False), help="Adam learning rate (per dataset; DDPM: 2e-4)")
    p.add_argument("--warmup-steps", type=count, help="linear learning-rate warm-up (per dataset; DDPM: 5000)")
    p.add_argument("--grad-clip", type=number(float, 0, low_inclusive=False), help="clip the gradient norm (DDPM: 1.0)")
    p.add_argument("--ema-decay", type=number(float, 0, 1), help="EMA decay of the weights sample.py uses (DDPM: 0.9999)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                   help="decay min(ema_decay, (1 + step) / (10 + step)) (per dataset; DDPM: no)")
    p.add_argument("--log-every", type=positive, help="steps between loss readings (the only GPU syncs)")
    p.add_argument("--ckpt-every", type=positive, help="steps between checkpoints")
    p.add_argument("--sample-every", type=count, help="steps between preview grids (0: none, not even at the end)")
    p.add_argument("--sample-steps", type=positive, help="T of the preview grids (paper: 256; CPU presets: 64)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt exactly (pass the same flags)")
    p.error = lambda message: fail(f"{message} (see python train.py --help)")
    args = p.parse_args(argv)
    recipe = DATASET_DEFAULTS[args.dataset]
    if args.dataset == IMAGE_FOLDER:  # the network, recipe and image size of its preset
        args.preset = args.preset or recipe["preset"]
        recipe = DATASET_DEFAULTS[args.preset]
        args.image_size = args.image_size or PRESETS[args.preset].image_size
    elif args.image_size is not None:
        fail(f"--image-size applies to --dataset {IMAGE_FOLDER} only: {args.dataset} trains at its own size")
    else:  # a named dataset: its own preset, or another network and recipe for the same image shape
        if args.preset is not None:
            fitting = [name for name in PRESETS if same_shape(PRESETS[name], PRESETS[args.dataset])]
            if args.preset not in fitting:
                fail(f"--preset {args.preset} is not a network for the images of {args.dataset}: choose one of "
                     f"{', '.join(fitting)}, or use --dataset {IMAGE_FOLDER}, which fits a preset to any images")
            recipe = DATASET_DEFAULTS[args.preset]
        args.image_size = PRESETS[args.dataset].image_size
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.holdout is None:  # data.HOLDOUT: mnist 200 per class (a 4,000-digit mnist-4k then trains on 2,000)
        args.holdout = HOLDOUT.get(args.dataset, 0)
    args.out_dir = args.out_dir or os.path.join("out", args.dataset)
    return args


def pick_device(args):
    """(device, rank, world_size): DDP switches on only when torchrun sets RANK and WORLD_SIZE."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} does not split evenly across {world_size} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def same_shape(a, b):
    """Whether two UNetConfigs take the same images and classes (so one's dataset can train the other)."""
    return (a.image_size, a.in_channels, a.num_classes) == (b.image_size, b.in_channels, b.num_classes)


def fit_config(config, image_size, in_channels, num_classes):
    """A preset's network for other images: their size, channels and number of classes, with self-attention
    at the same levels of the U-Net (level i works at H halved i times, rounding up, as UNet does)."""
    def level_sizes(size):
        sizes = [size]
        for _ in config.channel_mult[1:]:
            sizes.append((sizes[-1] + 1) // 2)
        return sizes
    attention = tuple(new for old, new in zip(level_sizes(config.image_size), level_sizes(image_size))
                      if old in config.attention_resolutions)
    return dataclasses.replace(config, image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                               attention_resolutions=attention)


def lock_out_dir(out_dir):
    """Hold out_dir for the rest of this process's life: (the open lock file, None), or (None, an error line).

    An exclusive flock on out_dir/train.lock, which holds this process's PID for the message that another
    run gets. The OS releases the lock when the process ends, however it ends (kill -9 too), so a lock
    is never stale; the file itself stays (removing it could let two runs lock two different files)."""
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # checkpoints are written to temporary files, then renamed
        lock = open(path, "a+")  # "a+": opening does not erase the PID written by a run that holds the lock
    except OSError as e:
        return None, f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable folder"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.seek(0)
        holder = lock.read().strip()  # empty only in the instant between the holder's flock and its write
        lock.close()
        if isinstance(e, BlockingIOError):
            who = f"another train.py (process {holder})" if holder else "another train.py that is starting"
            return None, (f"--out-dir {out_dir} is in use by {who}: wait for it to end or stop it, "
                          "or choose another --out-dir")
        return None, f"cannot lock {path} ({e.strerror}): choose an --out-dir on a local disk"
    lock.truncate(0)
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock, None


def resume_check(args, ckpt_path):
    """The checkpoint to continue (None for a new run), after checking that it is one of this dataset."""
    if not args.resume:
        if os.path.exists(ckpt_path):
            fail(f"{ckpt_path} exists: add --resume to continue it, or choose another --out-dir to start over")
        return None
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        fail(f"--resume: {e}")
    stored = ckpt.get("args", {})
    if stored.get("dataset") != args.dataset:
        fail(f"--resume: {ckpt_path} was trained on {stored.get('dataset')!r}, not {args.dataset!r}: "
             f"pass --dataset {stored.get('dataset')} or another --out-dir")
    for k, v in stored.items():
        if k not in ("resume", "device", "amp", "compile") and getattr(args, k, v) != v and int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: note: --{k.replace('_', '-')} was {v} in the checkpoint, now {getattr(args, k)}")
    return ckpt


def check_resumed_config(ckpt, config, ckpt_path):
    """--resume: the checkpoint's model config must be this run's (its preset, and an image folder's size,
    channels and number of classes)."""
    try:
        stored = dataclasses.asdict(config_from_dict(ckpt.get("config", {})))
    except TypeError:  # fields that UNetConfig does not have
        fail(f"--resume: the model config in {ckpt_path} has fields that today's model.py lacks: resume with the "
             "model.py it was trained with, or start a new --out-dir")
    changed = [f"{k} {stored[k]} -> {v}" for k, v in dataclasses.asdict(config).items() if stored[k] != v]
    if changed:
        fail(f"--resume: the model config in {ckpt_path} is not this run's ({', '.join(changed)}): resume with the "
             "model.py, flags and data it was trained with, or start a new --out-dir")


# ------------------------------------------------------------------ outputs

def draw_samples(ckpt_path, png_path, num_classes, steps, device, guidance_free=False):
    """A preview grid from the EMA weights, drawn by sample.py in its own process (train.py never imports
    sample.py). This is exactly the command a user runs on a checkpoint; the fixed seed gives every grid
    the same noise, so grids from different steps compare. Returns an error line, or None."""
    command = [sys.executable, SAMPLE_PY, "--ckpt", ckpt_path, "--w", *PREVIEW_W,
               "--classes", f"0-{num_classes - 1}", "--n-per-class", "1", "--steps", str(steps),
               "--seed", "0", "--out", png_path, "--device", device.type,
               *(["--guidance", "guidance-free"] if guidance_free else [])]
    # Without torchrun's variables: the preview is one process, not a rank of a distributed sample.py.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as e:
        return f"could not run sample.py: {e}"
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"sample.py exited with {result.returncode}: {last_line}"
    return None


def plot_losses(losses, path):
    """The per-step loss and its running mean, written to a temporary file and renamed."""
    losses = losses.double().numpy()
    window = max(1, min(200, len(losses) // 20))
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.5, alpha=0.3, label="per step")
    ax.plot(np.arange(window, len(losses) + 1), running, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss ‖ε_θ − ε‖² (per pixel)", yscale="log")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


# ------------------------------------------------------------------ the training script

def main(argv=None):
    # -------------------------------------------------------------- settings, out-dir lock and resume check
    args = parse_args(argv)
    device, rank, world_size = pick_device(args)
    ddp = dist.is_initialized()
    # Rank 0 holds --out-dir until its process ends (`lock` stays open); if it cannot, every rank stops.
    lock, error = lock_out_dir(args.out_dir) if rank == 0 else (None, None)
    if (any_rank(error is not None, device) if ddp else error is not None):
        if ddp:
            dist.destroy_process_group()  # every rank leaves together (torchrun then stops any still exiting)
        fail(error)  # printed by rank 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resume_check(args, ckpt_path)
    if rank == 0:  # temporary files of a save that was killed midway; ckpt.pt itself is always whole
        for stale in glob.glob(ckpt_path + ".tmp*"):
            os.remove(stale)

    # -------------------------------------------------------------- data: the whole dataset on the device
    try:  # uint8 (N, C, H, W), int64 (N,): the training split only
        images, labels = load_dataset(args.dataset, args.data_dir, train=True, image_size=args.image_size)
        classes = class_names(args.dataset, args.data_dir)  # label i is classes[i]
        images, labels, _, _ = split_holdout(images, labels, args.holdout)  # never trained on (--holdout)
    except DataError as e:
        fail(str(e))
    batches_per_epoch = len(labels) // args.batch_size  # full global batches; the rest of an epoch is skipped
    if batches_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} images of {args.dataset}")
    images, labels = images.to(device), labels.to(device)
    local_batch = args.batch_size // world_size

    # -------------------------------------------------------------- model, EMA, optimizer
    # A named dataset trains its preset (or --preset's, of the same shape) as it is; an image folder, its preset
    # fitted to the images.
    config = (fit_config(PRESETS[args.preset], args.image_size, images.shape[1], len(classes))
              if args.dataset == IMAGE_FOLDER else PRESETS[args.preset or args.dataset])
    if args.guidance_free:  # the strength input β that guidance-free training needs (off: the paper's network)
        config = dataclasses.replace(config, strength_input=True)
    if ckpt is not None:
        check_resumed_config(ckpt, config, ckpt_path)
    torch.manual_seed(args.seed)  # the initial weights (the same on every rank)
    raw_model = UNet(config).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # θ_ema: the weights sample.py uses
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr)  # DDPM: Adam, betas (0.9, 0.999)
    start_step, losses = 0, torch.zeros(args.max_steps, device=device)  # losses[s]: loss of step s (this rank)
    if ckpt is not None:
        try:
            raw_model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_step = ckpt["step"]
            losses = torch.zeros(max(args.max_steps, start_step), device=device)
            losses[:start_step] = ckpt["losses"].to(device)
        except (KeyError, RuntimeError, ValueError) as e:
            fail(f"--resume: {ckpt_path} is not a complete train.py checkpoint ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:120]}); start a new --out-dir")
    model = raw_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    if rank == 0:
        print(f"train.py: {args.dataset}, {len(labels)} images {tuple(images.shape[1:])} of {len(classes)} classes "
              f"({args.holdout} per class held out), UNet "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, device {device}, "
              f"{world_size} process(es), {start_step} steps done\n"
              + "\n".join(f"  {name:16s} {value}" for name, value in vars(args).items()))

    def save(step):  # a self-describing checkpoint (sample.py needs nothing else), written atomically
        save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "config": dataclasses.asdict(config), "args": vars(args),
                         "class_names": list(classes), "losses": losses[:step].cpu()}, ckpt_path)

    # Ctrl-C / SIGTERM ask the loop to stop after the current step and save; a second Ctrl-C stops at once.
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # -------------------------------------------------------------- the loop: Algorithm 1
    bar = tqdm(initial=start_step, total=args.max_steps, disable=rank != 0, unit="step", dynamic_ncols=True)
    last_log, t_log, perm_epoch = start_step, time.perf_counter(), None
    for step in range(start_step, args.max_steps):
        torch.manual_seed(step_seed(args.seed, step, rank))  # flips, ∅, λ, ε and dropout of this step
        epoch, i = divmod(step, batches_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(len(labels), args.seed, epoch).to(device), epoch
        start = i * args.batch_size + rank * local_batch  # this rank's share of the global batch
        idx = perm[start:start + local_batch]
        x = to_model_range(images[idx])  # Alg. 1, line 2: (B, C, H, W) in [−1, 1]
        if args.dataset == "cifar10":  # random horizontal flips (DDPM)
            flip = torch.rand(local_batch, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        losses[step] = train_step(model, ema, optimizer, x, labels[idx], config.num_classes, step, args)
        done = step + 1
        bar.update(1)

        stop = stop_requested
        if ddp:  # every process must leave at the same step: a stop request is agreed on at log steps
            stop = done % args.log_every == 0 and any_rank(stop_requested, device)
        draw = args.sample_every > 0 and (done % args.sample_every == 0 or done == args.max_steps)
        checkpoint = done % args.ckpt_every == 0 or draw or done == args.max_steps or stop
        if not (checkpoint or done % args.log_every == 0):
            continue

        # Read the loss (the only sync with the GPU); non-finite loss or weights end the run before any save.
        window = losses[last_log:done].mean()
        if ddp:
            dist.all_reduce(window)
            window /= world_size
        loss_value, now = window.item(), time.perf_counter()
        finite = math.isfinite(loss_value) and bool(torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all())
        if not finite:
            bar.close()
            if rank == 0:
                kept = (f"the last good checkpoint {ckpt_path} is untouched (lower --lr and --resume from it)"
                        if os.path.exists(ckpt_path) else "no checkpoint was written (lower --lr and start again)")
                what = f"the loss became {loss_value}" if not math.isfinite(loss_value) else "the weights became non-finite"
                print(f"train.py: error: {what} in steps {last_log + 1}-{done}; stopped, and {kept}", file=sys.stderr)
            sys.exit(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{args.batch_size * (done - last_log) / (now - t_log):.0f}")
        last_log = done

        if checkpoint and rank == 0:
            save(done)
        if draw and rank == 0:
            error = draw_samples(ckpt_path, os.path.join(args.out_dir, f"samples_{done:07d}.png"),
                                 config.num_classes, args.sample_steps, device, args.guidance_free)
            if error:
                tqdm.write(f"train.py: warning: no preview grid at step {done} ({error}); training goes on", file=sys.stderr)
        if stop:
            bar.close()
            if rank == 0:
                plot_losses(losses[:done].cpu(), os.path.join(args.out_dir, "loss.png"))
                print(f"train.py: stopped at step {done}; saved {ckpt_path}. To continue, run the same command "
                      "with --resume", file=sys.stderr)
            sys.exit(130)
        t_log = time.perf_counter()  # images/s counts training only, not saving or sampling
    bar.close()

    # -------------------------------------------------------------- the end (checkpoint and grid are written above)
    if rank == 0:
        done = max(start_step, args.max_steps)
        plot_losses(losses[:done].cpu(), os.path.join(args.out_dir, "loss.png"))
        print(f"train.py: {done} steps, final loss {losses[max(0, done - args.log_every):done].mean():.4f} (mean of "
              f"the last {min(done, args.log_every)} steps); outputs in {args.out_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

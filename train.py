"""Algorithm 1 of Classifier-Free Diffusion Guidance (Ho & Salimans, arXiv 2207.12598).

One network learns both ε_θ(z_λ, c) and ε_θ(z_λ) = ε_θ(z_λ, ∅): labels are dropped to ∅ at random.

    Algorithm 1: joint training
    1: repeat
    2:   (x, c) ~ p(x, c)                   a minibatch, images in [−1, 1]
    3:   c ← ∅ with probability p_uncond    per example                  (drop_labels)
    4:   λ ~ p(λ)                           λ = −2 log tan(a u + b)       (sample_logsnr)
    5:   ε ~ N(0, I)
    6:   z_λ = α_λ x + σ_λ ε
    7:   gradient step on ∇_θ ‖ε_θ(z_λ, c) − ε‖²                          (diffusion_loss)
    8: until converged

`train_step` is one step of the recipe (loss, clipping, Adam with warm-up, EMA); `main` is the run:
settings, data, model, loop, exact resume, previews, DistributedDataParallel under torchrun. Every
random number of step s on rank r comes from a seed of (seed, s, r) and epoch e's order from (seed,
e), so a resumed run, however the first one ended (kill -9 too), ends with the same weights.

    python train.py --dataset digits                    # offline 8x8 digits, minutes on a CPU
    python train.py --dataset cifar10 --preset cifar10-cpu --data-dir DIR   # CIFAR-10 on a CPU
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --amp --compile  # the DDPM recipe
    python train.py --dataset imagefolder --data-dir DIR --image-size 32    # DIR/train/<class>/*
    python train.py --dataset mnist --guidance-free     # GFT's loss (gft_loss) in place of line 7

Writes to --out-dir (default out/<dataset>): ckpt.pt, samples_<step>.png (rows w = 0, 1, 3, one
column per class, the same noise every time), loss.png, and train.lock while a run lives.
"""
import argparse
import copy
import dataclasses
import functools
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

import cli
import data
import guidance
import sample
from model import CheckpointError, UNet, config_from_dict, load_checkpoint, save_checkpoint
from presets import PRESETS, Recipe, fit_config, fits
from schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule, per_example, q_sample

LOCK_FILE = "train.lock"  # in --out-dir: held by the run that writes there (cli.lock_out_dir)
IMAGE_FOLDER_PRESET = "mnist"  # a user's images train this preset unless --preset says otherwise
PREVIEW_W = (0.0, 1.0, 3.0)  # rows of the preview grids: the paper's w (0 = no guidance)
fail = functools.partial(cli.fail, prog="train.py")


# ------------------------------------------------------------------ Algorithm 1 (pure functions)

def drop_labels(labels, p_uncond, null_label, generator=None):
    """Alg. 1, line 3: each label independently becomes ∅ with probability p_uncond."""
    drop_label = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop_label, torch.full_like(labels, null_label), labels)


def sample_logsnr(batch_size, schedule="cosine", generator=None, device=None):
    """Alg. 1, line 4: (B,) float32 λ ∈ [λ_min, λ_max] from u ~ U(0, 1).

    "cosine": λ = −2 log tan(a u + b), a density ∝ sech(λ/2) truncated to [λ_min, λ_max] (the
    paper's); "uniform": λ uniform on [λ_min, λ_max]."""
    u = torch.rand(batch_size, generator=generator, device=device)
    logsnr = logsnr_schedule(u, schedule)
    # tan(a u + b) in float32 can land a hair past λ_min as u → 1.
    return logsnr.clamp(LOGSNR_MIN, LOGSNR_MAX)


def diffusion_loss(model, x, labels, null_label, p_uncond=0.1, schedule="cosine", generator=None):
    """Alg. 1, lines 3-7 for a batch x (B, ...): the mean of (ε_θ(z_λ, c) − ε)² over all elements.

    Draws from `generator` (the global RNG if None): B uniforms for ∅, B for λ, then ε."""
    labels = drop_labels(labels, p_uncond, null_label, generator)  # line 3
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # line 4, (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # line 5
    z = q_sample(x, logsnr, eps)  # line 6: z_λ = α_λ x + σ_λ ε
    eps_pred = model(z, logsnr, labels)  # ε_θ(z_λ, c)
    # line 7: ‖ε_θ − ε‖², averaged over pixels as well as the batch (DDPM's "simple" loss)
    return F.mse_loss(eps_pred.float(), eps)


# ------------------------------------------------------------------ one step of the recipe

@torch.no_grad()
def update_ema(ema, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def train_step(model, ema, optimizer, x, labels, null_label, step, args):
    """One step (0-based) of Algorithm 1 with DDPM's recipe, on `model` (maybe DDP-wrapped or
    compiled) with train.py's settings `args`; returns the detached loss."""
    for group in optimizer.param_groups:  # linear learning-rate warm-up (DDPM)
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
    loss_fn = gft_loss if args.guidance_free else diffusion_loss
    amp = args.amp and x.device.type == "cuda"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(model, x, labels, null_label, args.p_uncond, args.logsnr_schedule)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    # Deviation from DDPM (CPU presets, ema_warmup): the decay ramps up, so early weights fade fast.
    decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
    update_ema(ema, model, decay)
    return loss.detach()


# ------------------------------------------------------------------ guidance-free training (off)

BETA_RANGE = (0.0, 1.0)  # β ~ U(0, 1): the authors' range (every w ≥ 0)


def sample_beta(batch_size, beta_min=BETA_RANGE[0], generator=None, device=None):
    """(B,) float32 β = β_min + (1 − β_min) u, u ~ U(0, 1), one per example."""
    if not BETA_RANGE[0] <= beta_min <= BETA_RANGE[1]:
        raise ValueError(f"beta_min = {beta_min} is outside [0, 1] (GFT: 0, every w >= 0)")
    u = torch.rand(batch_size, generator=generator, device=device)
    return beta_min + (1 - beta_min) * u


def gft_loss(model, x, labels, null_label, p_uncond=0.1, schedule="cosine", generator=None, *,
             beta_min=BETA_RANGE[0]):
    """Guidance-free training (Chen et al. 2025, arXiv 2501.15420) in place of line 7: with
    β = 1/(1 + w), ‖β ε_s(z_λ, c, β) + (1 − β) sg[ε_s(z_λ, ∅, 1)] − ε‖², β ~ U(β_min, 1), whose
    optimum ε_s(z, c, β) is CFG's ε̃ = (1 + w) ε*(z, c) − w ε*(z, ∅) in one evaluation
    (guidance.guidance_free_eps). As the authors' code: sg[·] (stop-gradient) runs the current
    weights in eval mode; an example dropped to ∅ is fed β = 1 but mixed with its drawn β. Draws
    as diffusion_loss (∅, λ, ε), then β: beta_min=1 gives diffusion_loss's value."""
    labels = drop_labels(labels, p_uncond, null_label, generator)  # line 3
    drop_label = labels == null_label  # True: c = ∅ (fed β = 1)
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # line 4, (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # line 5
    z = q_sample(x, logsnr, eps)  # line 6
    beta = sample_beta(x.shape[0], beta_min, generator, x.device)  # (B,)
    was_training = model.training  # sg[ε_s(z_λ, ∅, 1)]: no dropout, no gradient
    model.eval()
    try:
        with torch.no_grad():
            eps_uncond = model(z, logsnr, torch.full_like(labels, null_label),
                               strength=torch.ones_like(beta))
    finally:
        model.train(was_training)
    eps_sample = model(z, logsnr, labels, strength=torch.where(drop_label, 1.0, beta))
    beta = per_example(beta, x)  # (B,) -> (B, 1, 1, 1)
    eps_cond = beta * eps_sample + (1 - beta) * eps_uncond  # GFT's ε_θ(z_λ, c)
    return F.mse_loss(eps_cond.float(), eps)  # line 7


# ------------------------------------------------------------------ randomness and data order

def step_seed(seed, step, rank):
    """The seed of all random draws of one training step on one rank."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def epoch_permutation(n, seed, epoch):
    """The data order of one epoch: the same on every rank, a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(step_seed(seed, epoch, 2 ** 31))  # apart from steps
    return torch.randperm(n, generator=generator)


def random_flips(x):
    """Each image mirrored left-right with probability 1/2 (DDPM, for natural images)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# ------------------------------------------------------------------ settings

def parse_args(argv=None):
    """train.py's settings: the command line, then the preset's recipe for what it leaves out."""
    p = cli.parser("train.py", __doc__, epilog="Presets (presets.py): " + "; ".join(
        f"{name}: {preset.recipe}" for name, preset in PRESETS.items()))
    positive, count = cli.number(int, 1), cli.number(int, 0)
    above_0 = cli.number(float, 0, low_inclusive=False)
    p.add_argument("--dataset", default="digits", choices=data.names())
    p.add_argument("--data-dir", default="./data",
                   help="where data.py finds the files (imagefolder: DIR/train/<class>/)")
    p.add_argument("--preset", choices=list(PRESETS), help="network and recipe (presets.py; "
                   f"default the dataset's, imagefolder {IMAGE_FOLDER_PRESET}'s) for its images")
    p.add_argument("--image-size", type=cli.number(int, 8),
                   help="imagefolder only: H = W the images are brought to (default the preset's)")
    p.add_argument("--holdout", type=count, help="images per class left out of training for the "
                   "metrics' real reference (data.split_holdout; default the dataset's)")
    p.add_argument("--out-dir", help="checkpoint, grids and loss curve (default out/<dataset>)")
    p.add_argument("--p-uncond", type=cli.number(float, 0, 1, high_inclusive=True), default=0.1,
                   help="probability of ∅ (paper: 0.1; 0.2 was as good)")
    p.add_argument("--logsnr-schedule", choices=["cosine", "uniform"], default="cosine")
    p.add_argument("--guidance-free", action="store_true", help="guidance-free training "
                   "(gft_loss) in place of line 7: samples CFG's w in one evaluation "
                   "(sample.py --guidance guidance-free); a deviation, off by default")
    p.add_argument("--max-steps", type=positive, help="training steps")
    p.add_argument("--batch-size", type=positive, help="global batch, split across ranks")
    p.add_argument("--lr", type=above_0, help="Adam learning rate (DDPM: 2e-4)")
    p.add_argument("--warmup-steps", type=count, help="linear lr warm-up (DDPM: 5000)")
    p.add_argument("--grad-clip", type=above_0, help="clip the gradient norm (DDPM: 1.0)")
    p.add_argument("--ema-decay", type=cli.number(float, 0, 1), help="EMA decay (DDPM: 0.9999)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                   help="decay min(ema_decay, (1 + step) / (10 + step)) (DDPM: no)")
    p.add_argument("--log-every", type=positive, help="steps between loss readings (GPU syncs)")
    p.add_argument("--ckpt-every", type=positive, help="steps between checkpoints")
    p.add_argument("--sample-every", type=count, help="steps between preview grids (0: none)")
    p.add_argument("--sample-steps", type=positive, help="T of the previews (paper: 256)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true",
                   help="continue out_dir/ckpt.pt exactly (run the same command with --resume)")
    p.add_argument("--json", metavar="PATH", help="also write the run's figures as JSON")
    args = p.parse_args(argv)
    if args.dataset == data.IMAGE_FOLDER:  # the preset's network, recipe and image size
        args.preset = args.preset or IMAGE_FOLDER_PRESET
        args.image_size = args.image_size or PRESETS[args.preset].network.image_size
        holdout = 0
    elif args.image_size is not None:
        fail(f"--image-size applies to --dataset {data.IMAGE_FOLDER} only: "
             f"{args.dataset} trains at its own size")
    else:  # a named dataset: its own preset, or another network for the same images
        dataset = data.DATASETS[args.dataset]
        fitting = [name for name, preset in PRESETS.items() if fits(preset.network, dataset)]
        if args.preset is not None and args.preset not in fitting:
            fail(f"--preset {args.preset} is not a network for the images of {args.dataset}: "
                 f"choose one of {', '.join(fitting)}, or use --dataset {data.IMAGE_FOLDER}, "
                 "which fits a preset to any images")
        args.preset = args.preset or dataset.preset
        args.image_size = PRESETS[args.preset].network.image_size
        holdout = dataset.holdout
    recipe = PRESETS[args.preset].recipe
    for field in dataclasses.fields(Recipe):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(recipe, field.name))
    args.holdout = holdout if args.holdout is None else args.holdout
    args.out_dir = args.out_dir or os.path.join("out", args.dataset)
    return args


def resume_check(args, ckpt_path):
    """The checkpoint to continue (None for a new run), after checking it is of this dataset."""
    if not args.resume:
        if os.path.exists(ckpt_path):
            fail(f"{ckpt_path} exists: add --resume to continue it, or choose another --out-dir to "
                 "start over")
        return None
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        fail(f"--resume: {e}")
    stored = ckpt.get("args", {})
    if stored.get("dataset") != args.dataset:
        fail(f"--resume: {ckpt_path} was trained on {stored.get('dataset')!r}, not "
             f"{args.dataset!r}: pass --dataset {stored.get('dataset')} or another --out-dir")
    if int(os.environ.get("RANK", 0)) == 0:
        for k, v in stored.items():
            if k not in ("resume", "device", "amp", "compile", "json") and getattr(args, k, v) != v:
                print(f"train.py: note: --{k.replace('_', '-')} was {v} in the checkpoint, "
                      f"now {getattr(args, k)}")
    return ckpt


def check_resumed_config(ckpt, config, ckpt_path):
    """--resume: the checkpoint's model config must be this run's."""
    try:
        stored = dataclasses.asdict(config_from_dict(ckpt.get("config", {})))
    except TypeError:  # fields that UNetConfig does not have
        fail(f"--resume: the model config in {ckpt_path} has fields that today's model.py lacks: "
             "resume with the model.py it was trained with, or start a new --out-dir")
    changed = ", ".join(f"{k} {stored[k]} -> {v}" for k, v in dataclasses.asdict(config).items()
                        if stored[k] != v)
    if changed:
        fail(f"--resume: the model config in {ckpt_path} is not this run's ({changed}): resume "
             "with the model.py, flags and data it was trained with, or start a new --out-dir")


# ------------------------------------------------------------------ outputs

def draw_preview(ema, png_path, class_names, steps, guidance_free=False):
    """A grid from the EMA weights (rows w = PREVIEW_W, a column per class), on sample.py's noise
    of seed (0, c, 0) every time, so that grids compare across steps; an error line, or None."""
    num_classes, device = len(class_names), next(ema.parameters()).device
    rule = guidance.RULES["guidance-free" if guidance_free else "cfg"]
    labels = torch.arange(num_classes, device=device)
    try:
        rows = [sample.sample(ema, labels, w, steps, guidance=rule, generator=[
            torch.Generator().manual_seed(sample.noise_seed(0, c, 0)) for c in range(num_classes)])
            for w in PREVIEW_W]
        grid = torch.stack(rows)[:, :, None].cpu()  # (rows, classes, 1, C, H, W)
        sample.save_grid(grid, png_path, [f"w = {w:g}" for w in PREVIEW_W], list(class_names))
    except (OSError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def plot_losses(losses, path):
    """The per-step loss and its running mean, written atomically."""
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
    cli.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def load_data(args, device):
    """The training split less the held-out images, on the device; its class names; flips."""
    try:
        images, labels = data.load_dataset(args.dataset, args.data_dir, train=True,
                                           image_size=args.image_size)
        classes = data.class_names(args.dataset, args.data_dir)  # label i is classes[i]
        images, labels, _, _ = data.split_holdout(images, labels, args.holdout)
    except data.DataError as e:
        fail(str(e))
    if len(labels) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} images of "
             f"{args.dataset}")
    flips = args.dataset in data.DATASETS and data.DATASETS[args.dataset].flips
    return images.to(device), labels.to(device), classes, flips


def build(args, config, ckpt, ckpt_path, device):
    """(network, EMA, Adam, steps done, per-step losses): fresh, or from the checkpoint."""
    torch.manual_seed(args.seed)  # the initial weights, the same on every rank
    model = UNet(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # θ_ema: the weights sample.py uses
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # DDPM: betas (0.9, 0.999)
    if ckpt is None:
        return model, ema, optimizer, 0, torch.zeros(args.max_steps, device=device)
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        losses = torch.zeros(max(args.max_steps, start_step), device=device)
        losses[:start_step] = ckpt["losses"].to(device)
    except (KeyError, RuntimeError, ValueError) as e:
        fail(f"--resume: {ckpt_path} is not a complete train.py checkpoint ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:120]}); start a new --out-dir")
    return model, ema, optimizer, start_step, losses


def non_finite(model, loss, first, last, ckpt_path):
    """The error line if the loss or the weights are not finite, else None."""
    finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all()
    if math.isfinite(loss) and bool(finite):
        return None
    kept = "no checkpoint was written (lower --lr and start again)"
    if os.path.exists(ckpt_path):
        kept = f"the last good checkpoint {ckpt_path} is untouched (lower --lr, --resume from it)"
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became non-finite"
    return f"train.py: error: {what} in steps {first}-{last}; stopped, and {kept}"


# ------------------------------------------------------------------ the training script

def main(argv=None):
    # -------------------------------------------------------------- settings, lock, resume check
    args = parse_args(argv)
    if args.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        fail(f"--batch-size {args.batch_size} does not split evenly across "
             f"{os.environ['WORLD_SIZE']} processes")
    device, rank, world_size = cli.distributed(args.device, fail)
    ddp = dist.is_initialized()
    lock, error = (cli.lock_out_dir(args.out_dir, LOCK_FILE, "train.py") if rank == 0
                   else (None, None))  # held until the process ends
    if cli.any_rank(error is not None, device) if ddp else error is not None:
        if ddp:
            dist.destroy_process_group()  # every rank leaves together
        fail(error)  # printed by rank 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resume_check(args, ckpt_path)
    if rank == 0:  # temporary files of a save that was killed midway (ckpt.pt is always whole)
        for stale in glob.glob(ckpt_path + ".tmp*"):
            os.remove(stale)

    # -------------------------------------------------------------- data, model, EMA, optimizer
    images, labels, classes, flips = load_data(args, device)
    batches_per_epoch = len(labels) // args.batch_size  # full global batches; the rest is skipped
    local_batch = args.batch_size // world_size
    network = PRESETS[args.preset].network
    if args.dataset == data.IMAGE_FOLDER:  # the preset's network fitted to the images
        network = fit_config(network, args.image_size, images.shape[1], len(classes))
    config = dataclasses.replace(network, strength_input=args.guidance_free)  # GFT's β input
    if ckpt is not None:
        check_resumed_config(ckpt, config, ckpt_path)
    raw_model, ema, optimizer, start_step, losses = build(args, config, ckpt, ckpt_path, device)
    model = raw_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    if rank == 0:
        n_params = sum(p.numel() for p in raw_model.parameters()) / 1e6
        print(f"train.py: {args.dataset}, {len(labels)} images {tuple(images.shape[1:])} of "
              f"{len(classes)} classes ({args.holdout} per class held out), UNet {n_params:.2f}M "
              f"parameters, device {device}, {world_size} process(es), {start_step} steps done\n"
              + "\n".join(f"  {name:16s} {value}" for name, value in vars(args).items()))

    def save(step):  # self-describing (sample.py needs nothing else), written atomically
        save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(),
                         "optimizer": optimizer.state_dict(), "step": step,
                         "config": dataclasses.asdict(config), "args": vars(args),
                         "class_names": list(classes), "losses": losses[:step].cpu()}, ckpt_path)

    # -------------------------------------------------------------- the loop: Algorithm 1
    stop_request = cli.StopRequest()
    bar = tqdm(initial=start_step, total=args.max_steps, disable=rank != 0, unit="step",
               dynamic_ncols=True)
    last_log, t_log, perm_epoch, train_seconds = start_step, time.perf_counter(), None, 0.0
    for step in range(start_step, args.max_steps):
        torch.manual_seed(step_seed(args.seed, step, rank))  # ∅, λ, ε, flips and dropout
        epoch, i = divmod(step, batches_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(len(labels), args.seed, epoch).to(device), epoch
        start = i * args.batch_size + rank * local_batch  # this rank's share of the global batch
        idx = perm[start:start + local_batch]
        x = data.to_model_range(images[idx])  # Alg. 1, line 2: (B, C, H, W) in [−1, 1]
        x = random_flips(x) if flips else x
        losses[step] = train_step(model, ema, optimizer, x, labels[idx], config.num_classes,
                                  step, args)
        done = step + 1
        bar.update(1)

        stop = stop_request.requested
        if ddp:  # every process leaves at the same step: a stop is agreed on at log steps
            stop = done % args.log_every == 0 and cli.any_rank(stop, device)
        draw = args.sample_every > 0 and (done % args.sample_every == 0 or done == args.max_steps)
        checkpoint = done % args.ckpt_every == 0 or draw or done == args.max_steps or stop
        if not (checkpoint or done % args.log_every == 0):
            continue
        window = losses[last_log:done].mean()  # the loop's only GPU sync
        if ddp:
            dist.all_reduce(window)
        loss = window.item() / world_size
        error = non_finite(raw_model, loss, last_log + 1, done, ckpt_path)
        if error:  # the run ends before anything is saved
            bar.close()
            if rank == 0:
                print(error, file=sys.stderr)
            sys.exit(1)
        train_seconds += time.perf_counter() - t_log
        images_per_s = args.batch_size * (done - last_log) / (time.perf_counter() - t_log)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
        last_log = done
        if checkpoint and rank == 0:
            save(done)
        if draw and rank == 0:
            png = os.path.join(args.out_dir, f"samples_{done:07d}.png")
            error = draw_preview(ema, png, classes, args.sample_steps, args.guidance_free)
            if error:
                tqdm.write(f"train.py: warning: no preview grid at step {done} ({error})",
                           file=sys.stderr)  # training goes on
        if stop:
            bar.close()
            if rank == 0:
                plot_losses(losses[:done].cpu(), os.path.join(args.out_dir, "loss.png"))
                print(f"train.py: stopped at step {done}; saved {ckpt_path}. To continue, run the "
                      "same command with --resume", file=sys.stderr)
                cli.release_out_dir(lock)
            sys.exit(130)
        t_log = time.perf_counter()  # images/s counts training only, not saving or sampling
    bar.close()

    # -------------------------------------------------------------- the end
    if rank == 0:
        done = max(start_step, args.max_steps)
        plot_losses(losses[:done].cpu(), os.path.join(args.out_dir, "loss.png"))
        last = losses[max(0, done - args.log_every):done].mean()
        print(f"train.py: {done} steps, final loss {last:.4f} (mean of the last "
              f"{min(done, args.log_every)} steps); outputs in {args.out_dir}")
        if args.json:  # training time alone, not saving or sampling
            run = done - start_step
            cli.write_json(args.json, dict(
                steps=done, steps_this_run=run, final_loss=last.item(), checkpoint=ckpt_path,
                train_seconds=train_seconds, processes=world_size, batch_size=args.batch_size,
                images_per_second=args.batch_size * run / train_seconds if run else None))
        cli.release_out_dir(lock)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

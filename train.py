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

`drop_labels`, `sample_logsnr` and `diffusion_loss` are pure functions that work for any module
with forward(z, logsnr, labels) and a `null_label` attribute (the notebooks and bench.py import
them). The script body in `main` is the rest of a training run, top to bottom: settings, data,
model, optimizer, loop. Around Algorithm 1 it adds what DDPM's recipe adds (Adam, learning-rate
warm-up, gradient clipping, an EMA of the weights that sample.py uses), checkpoints that resume
exactly, preview grids drawn by sample.py, and DistributedDataParallel when torchrun starts it.

Randomness: every random number of step s on rank r (flips, ∅, λ, ε and the network's dropout)
comes from the global RNG seeded with (seed, s, r), and epoch e's data order from (seed, e). A
resumed run therefore redraws exactly what the interrupted one would have drawn, whatever
killed it (even kill -9): on a CPU it ends with the same weights as a run that never stopped.

    python train.py --dataset digits                    # offline 8x8 digits: ~9 min on 2 shared CPU cores
    python train.py --dataset mnist --data-dir ./data   # downloads the official files on first use
    python train.py --dataset cifar10 --amp --compile   # the DDPM CIFAR-10 recipe, one GPU
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --amp --compile
    python train.py --dataset digits --resume           # continue out/digits/ckpt.pt (same flags + --resume)

Outputs in --out-dir (default out/<dataset>): ckpt.pt, samples_<step>.png (rows w = 0, 1, 3;
columns the classes; the same noise at every step), loss.png.
"""
import argparse
import copy
import glob
import math
import os
import signal
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

from data import DATASETS, DataError, load_dataset, to_model_range
from model import (PRESETS, CheckpointError, UNet, config_from_dict, config_to_dict, load_checkpoint, save_checkpoint,
                   speed_up_cpu)
from schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_cosine, logsnr_uniform, q_sample

SAMPLE_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py")

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
    "mnist": dict(batch_size=32, lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True,
                  max_steps=2000, log_every=25, ckpt_every=250, sample_every=500, sample_steps=64),
    "fashion-mnist": dict(batch_size=32, lr=1e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True,
                          max_steps=2000, log_every=25, ckpt_every=250, sample_every=500, sample_steps=64),
}
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
    if schedule == "cosine":
        logsnr = logsnr_cosine(u)
    elif schedule == "uniform":
        logsnr = logsnr_uniform(u)
    else:
        raise ValueError(f"unknown log-SNR schedule {schedule!r}: use 'cosine' or 'uniform'")
    # tan(a u + b) in float32 can land a hair past λ_min as u → 1 (a u + b is then within 5e-5 of π/2).
    return logsnr.clamp(LOGSNR_MIN, LOGSNR_MAX)


def diffusion_loss(model, x, labels, p_uncond=0.1, schedule="cosine", generator=None):
    """Alg. 1, lines 3-7 for a batch x of shape (B, ...): the mean of (ε_θ(z_λ, c) − ε)² over all elements.

    Draws from `generator` (the global RNG if None), in this order: B uniforms for ∅, B uniforms for λ,
    then ε of x's shape. The null label is `model.null_label`.
    """
    labels = drop_labels(labels, p_uncond, model.null_label, generator)  # line 3
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # line 4, (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # line 5
    z = q_sample(x, logsnr, eps)  # line 6: z_λ = α_λ x + σ_λ ε
    eps_pred = model(z, logsnr, labels)  # ε_θ(z_λ, c)
    # line 7: ‖ε_θ − ε‖², averaged over pixels as well as the batch (DDPM's "simple" loss)
    return F.mse_loss(eps_pred.float(), eps)


# ------------------------------------------------------------------ helpers of the script body

@torch.no_grad()
def update_ema(ema, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ, for every parameter at once."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def adam(params, lr):
    """DDPM's optimizer: Adam, betas (0.9, 0.999). fused=True updates each tensor in one kernel
    instead of a dozen (the same math; the mnist preset's optimizer step on CPU: 7.3 → 3.0 ms)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


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


def fail(message):
    """Bad input: one line on stderr (from rank 0 only), exit code 2, no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def draw_samples(ckpt_path, png_path, num_classes, steps, device):
    """A preview grid from the EMA weights, drawn by sample.py in its own process (train.py never imports
    sample.py). This is exactly the command a user runs on a checkpoint; the fixed seed gives every grid
    the same noise, so grids from different steps compare. Returns an error line, or None."""
    command = [sys.executable, SAMPLE_PY, "--ckpt", ckpt_path, "--w", *PREVIEW_W,
               "--classes", f"0-{num_classes - 1}", "--n-per-class", "1", "--steps", str(steps),
               "--seed", "0", "--out", png_path, "--device", device.type]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
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
    # -------------------------------------------------------------- settings
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Per-dataset defaults: " + "; ".join(
                                    f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                    for name, d in DATASET_DEFAULTS.items()))
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default="./data", help="where data.py finds or downloads the files")
    p.add_argument("--out-dir", default=None, help="checkpoint, sample grids and loss curve (default out/<dataset>)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of ∅ (paper: 0.1; 0.2 was as good)")
    p.add_argument("--logsnr-schedule", choices=["cosine", "uniform"], default="cosine", help="p(λ) (paper: cosine)")
    p.add_argument("--max-steps", type=int, help="training steps (per dataset)")
    p.add_argument("--batch-size", type=int, help="global batch, split across ranks (per dataset)")
    p.add_argument("--lr", type=float, help="Adam learning rate (per dataset; DDPM: 2e-4)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up (per dataset; DDPM: 5000)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (DDPM: 1.0)")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the weights sample.py uses (DDPM: 0.9999)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                   help="decay min(ema_decay, (1 + step) / (10 + step)) (per dataset; DDPM: no)")
    p.add_argument("--log-every", type=int, help="steps between loss readings (the only GPU syncs)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, help="steps between preview grids (0: none, not even at the end)")
    p.add_argument("--sample-steps", type=int, help="T of the preview grids (paper: 256; CPU presets: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt exactly (pass the same flags)")
    p.error = lambda message: fail(f"{message} (see python train.py --help)")
    args = p.parse_args(argv)
    for name, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out_dir = args.out_dir or os.path.join("out", args.dataset)

    for name in ("max_steps", "batch_size", "log_every", "ckpt_every", "sample_steps"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup_steps", "sample_every", "seed"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0.0 <= args.p_uncond <= 1.0:
        fail(f"--p-uncond {args.p_uncond} is outside [0, 1] (paper: 0.1)")
    if not (math.isfinite(args.lr) and args.lr > 0 and math.isfinite(args.grad_clip) and args.grad_clip > 0):
        fail(f"--lr and --grad-clip must be positive numbers, got {args.lr} and {args.grad_clip}")
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema-decay {args.ema_decay} is outside [0, 1) (DDPM: 0.9999)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")

    # DDP switches on only when torchrun sets RANK and WORLD_SIZE.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} does not split evenly across {world_size} processes")
    local_batch = args.batch_size // world_size
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    use_amp = args.amp and device.type == "cuda"

    # -------------------------------------------------------------- output folder and checkpoint
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as e:
        fail(f"cannot write to --out-dir {args.out_dir}: {e.strerror}; choose a writable folder")
    ckpt = None
    if args.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            fail(f"--resume: {e}")
        stored = ckpt.get("args", {})
        if stored.get("dataset") != args.dataset:
            fail(f"--resume: {ckpt_path} was trained on {stored.get('dataset')!r}, not {args.dataset!r}: "
                 f"pass --dataset {stored.get('dataset')} or another --out-dir")
        try:
            same_config = config_from_dict(ckpt["config"]) == PRESETS[args.dataset]
        except TypeError:  # fields that UNetConfig does not have
            same_config = False
        if not same_config:
            fail(f"--resume: the model config in {ckpt_path} is not today's {args.dataset} preset in model.py: "
                 "resume with the model.py it was trained with, or start a new --out-dir")
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: add --resume to continue it, or choose another --out-dir to start over")
    if rank == 0:  # temporary files of a save that was killed midway; ckpt.pt itself is always whole
        for stale in glob.glob(ckpt_path + ".tmp*"):
            os.remove(stale)

    # -------------------------------------------------------------- data
    try:
        images, labels = load_dataset(args.dataset, args.data_dir)  # uint8 (N, C, H, W), int64 (N,)
    except DataError as e:
        fail(str(e))
    batches_per_epoch = len(labels) // args.batch_size  # full global batches; the rest of an epoch is skipped
    if batches_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} images of {args.dataset}")
    images, labels = images.to(device), labels.to(device)  # the whole dataset on the device, as one tensor
    hflip = args.dataset == "cifar10"  # random horizontal flips for CIFAR-10 only (DDPM)

    # -------------------------------------------------------------- model, EMA, optimizer
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    config = PRESETS[args.dataset]
    torch.manual_seed(args.seed)  # the initial weights (the same on every rank)
    raw_model = UNet(config).to(device)
    if device.type == "cpu":
        raw_model = speed_up_cpu(raw_model)  # channels_last, and malloc keeps freed memory
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # θ_ema: the weights sample.py uses
    optimizer = adam(raw_model.parameters(), args.lr)
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
        model.null_label = raw_model.null_label  # diffusion_loss reads model.null_label
    if args.compile:
        model = torch.compile(model)

    if rank == 0:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"train.py: {args.dataset}, {len(labels)} images {tuple(images.shape[1:])}, UNet {n_params / 1e6:.2f}M "
              f"parameters, device {device}, {world_size} process(es), {start_step} steps done")
        for name, value in vars(args).items():
            print(f"  {name:16s} {value}")
        if args.amp and not use_amp:
            print("  (--amp is ignored: bfloat16 autocast is used on CUDA only)")
        if ckpt is not None:
            changed = {k: (v, getattr(args, k)) for k, v in ckpt["args"].items()
                       if k not in ("resume", "device", "amp", "compile") and getattr(args, k, v) != v}
            for k, (old, new) in changed.items():
                print(f"  note: --{k.replace('_', '-')} was {old} in the checkpoint, now {new}")

    def make_checkpoint(step):
        return {"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "config": config_to_dict(config), "args": vars(args),
                "rng": {"seed": args.seed, "rule": "step s on rank r: torch.manual_seed(step_seed(seed, s, r)); "
                        "epoch e: epoch_permutation(n, seed, e)"},
                "losses": losses[:step].cpu()}

    def all_finite():  # parameters must be finite before they overwrite the last good checkpoint
        return bool(torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all())

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
        if hflip:
            flip = torch.rand(local_batch, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)

        for group in optimizer.param_groups:  # linear warm-up (DDPM)
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = diffusion_loss(model, x, labels[idx], args.p_uncond, args.logsnr_schedule)  # Alg. 1, 3-7
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
        update_ema(ema, raw_model, decay)
        losses[step] = loss.detach()  # stays on the device: no sync
        done = step + 1
        bar.update(1)

        stop = stop_requested
        if ddp:  # every process must leave at the same step: a stop request is agreed on at log steps
            stop = done % args.log_every == 0 and any_rank(stop_requested, device)
        draw = args.sample_every > 0 and (done % args.sample_every == 0 or done == args.max_steps)
        save = done % args.ckpt_every == 0 or draw or done == args.max_steps or stop
        if not (save or done % args.log_every == 0):
            continue

        # Read the loss (the only sync with the GPU); a non-finite loss ends the run before any save.
        window = losses[last_log:done].mean()
        if ddp:
            dist.all_reduce(window)
            window /= world_size
        loss_value, now = window.item(), time.perf_counter()
        if not math.isfinite(loss_value) or (save and not all_finite()):
            bar.close()
            what = f"the loss became {loss_value}" if not math.isfinite(loss_value) else "the weights became non-finite"
            if rank == 0:
                kept = (f"the last good checkpoint {ckpt_path} is untouched (lower --lr and --resume from it)"
                        if os.path.exists(ckpt_path) else "no checkpoint was written (lower --lr and start again)")
                print(f"train.py: error: {what} in steps {last_log + 1}-{done}; stopped, and "
                      f"{kept}", file=sys.stderr)
            sys.exit(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{args.batch_size * (done - last_log) / (now - t_log):.0f}")
        last_log = done

        if save and rank == 0:
            save_checkpoint(make_checkpoint(done), ckpt_path)
        if draw and rank == 0:
            error = draw_samples(ckpt_path, os.path.join(args.out_dir, f"samples_{done:07d}.png"),
                                 config.num_classes, args.sample_steps, device)
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

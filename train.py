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
`main` is the rest of a run, top to bottom: settings, resume check, data, model, loop, with checkpoints
that resume exactly, preview grids drawn by sample.py, and DistributedDataParallel under torchrun.

Randomness: every random number of step s on rank r (flips, ∅, λ, ε and the network's dropout)
comes from the global RNG seeded with (seed, s, r), and epoch e's data order from (seed, e). A
resumed run therefore redraws exactly what the interrupted one would have drawn, whatever
killed it (even kill -9): on a CPU it ends with the same weights as a run that never stopped.

    python train.py --dataset digits                    # offline 8x8 digits, a CPU minute or two
    python train.py --dataset mnist --data-dir ./data   # downloads the official files on first use
    python train.py --dataset cifar10 --amp --compile   # the DDPM CIFAR-10 recipe, one GPU
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --amp --compile
    python train.py --dataset digits --resume           # continue out/digits/ckpt.pt (same flags + --resume)

Outputs in --out-dir (default out/<dataset>): ckpt.pt, samples_<step>.png (rows w = 0, 1, 3;
columns the classes; the same noise at every step), loss.png.
"""
import argparse
import copy
import dataclasses
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

from data import DATASETS, HOLDOUT, DataError, load_dataset, split_holdout, to_model_range
from model import PRESETS, CheckpointError, UNet, config_from_dict, load_checkpoint, save_checkpoint
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
    # mnist (and fashion-mnist): the recipe search's choice (README, "A recipe for CPU minutes"): batch 64 at
    # lr 2e-3, 4,000 steps (its training time per machine: README, "Results measured here").
    "mnist": dict(batch_size=64, lr=2e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True,
                  max_steps=4000, log_every=100, ckpt_every=500, sample_every=1000, sample_steps=64),
}
DATASET_DEFAULTS["fashion-mnist"] = DATASET_DEFAULTS["mnist"]
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


# ------------------------------------------------------------------ one step of the training recipe

@torch.no_grad()
def update_ema(ema, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def train_step(model, ema, optimizer, x, labels, null_label, step, args):
    """One step (0-based `step`) of Algorithm 1 with DDPM's optimisation recipe; returns the detached loss.

    model: the network to call (possibly DDP-wrapped or compiled; its parameters are the trained ones).
    args: train.py's settings; reads p_uncond, logsnr_schedule, lr, warmup_steps, grad_clip, ema_decay,
    ema_warmup and amp (bfloat16 autocast, CUDA only).
    """
    for group in optimizer.param_groups:  # linear learning-rate warm-up (DDPM)
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp and x.device.type == "cuda"):
        loss = diffusion_loss(model, x, labels, null_label, args.p_uncond, args.logsnr_schedule)  # Alg. 1, 3-7
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

def fail(message):
    """Bad input: one line on stderr (from rank 0 only), exit code 2, no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"train.py: error: {message}", file=sys.stderr)
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
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default="./data", help="where data.py finds or downloads the files")
    p.add_argument("--holdout", type=count, help="images per class left out of training, for the metrics' "
                   "real reference (data.split_holdout; per dataset: mnist 200, others 0)")
    p.add_argument("--out-dir", default=None, help="checkpoint, sample grids and loss curve (default out/<dataset>)")
    p.add_argument("--p-uncond", type=number(float, 0, 1, high_inclusive=True), default=0.1,
                   help="probability of ∅ (paper: 0.1; 0.2 was as good)")
    p.add_argument("--logsnr-schedule", choices=["cosine", "uniform"], default="cosine", help="p(λ) (paper: cosine)")
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
    for name, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.holdout is None:  # data.HOLDOUT: mnist 200 per class (../shared/data/mnist-4k then trains on 2,000)
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


def resume_check(args, ckpt_path):
    """The checkpoint to continue (None for a new run), after checking that it belongs to this run."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as e:
        fail(f"cannot write to --out-dir {args.out_dir}: {e.strerror}; choose a writable folder")
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
    try:
        same_config = config_from_dict(ckpt["config"]) == PRESETS[args.dataset]
    except TypeError:  # fields that UNetConfig does not have
        same_config = False
    if not same_config:
        fail(f"--resume: the model config in {ckpt_path} is not today's {args.dataset} preset in model.py: "
             "resume with the model.py it was trained with, or start a new --out-dir")
    for k, v in stored.items():
        if k not in ("resume", "device", "amp", "compile") and getattr(args, k, v) != v and int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: note: --{k.replace('_', '-')} was {v} in the checkpoint, now {getattr(args, k)}")
    return ckpt


# ------------------------------------------------------------------ outputs

def draw_samples(ckpt_path, png_path, num_classes, steps, device):
    """A preview grid from the EMA weights, drawn by sample.py in its own process (train.py never imports
    sample.py). This is exactly the command a user runs on a checkpoint; the fixed seed gives every grid
    the same noise, so grids from different steps compare. Returns an error line, or None."""
    command = [sys.executable, SAMPLE_PY, "--ckpt", ckpt_path, "--w", *PREVIEW_W,
               "--classes", f"0-{num_classes - 1}", "--n-per-class", "1", "--steps", str(steps),
               "--seed", "0", "--out", png_path, "--device", device.type]
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
    # -------------------------------------------------------------- settings and resume check
    args = parse_args(argv)
    device, rank, world_size = pick_device(args)
    ddp = dist.is_initialized()
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resume_check(args, ckpt_path)
    if rank == 0:  # temporary files of a save that was killed midway; ckpt.pt itself is always whole
        for stale in glob.glob(ckpt_path + ".tmp*"):
            os.remove(stale)

    # -------------------------------------------------------------- data: the whole dataset on the device
    try:
        images, labels = load_dataset(args.dataset, args.data_dir)  # uint8 (N, C, H, W), int64 (N,)
        images, labels, _, _ = split_holdout(images, labels, args.holdout)  # never trained on (--holdout)
    except DataError as e:
        fail(str(e))
    batches_per_epoch = len(labels) // args.batch_size  # full global batches; the rest of an epoch is skipped
    if batches_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} images of {args.dataset}")
    images, labels = images.to(device), labels.to(device)
    local_batch = args.batch_size // world_size

    # -------------------------------------------------------------- model, EMA, optimizer
    config = PRESETS[args.dataset]
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
        print(f"train.py: {args.dataset}, {len(labels)} images {tuple(images.shape[1:])} ({args.holdout} per class "
              f"held out), UNet "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, device {device}, "
              f"{world_size} process(es), {start_step} steps done\n"
              + "\n".join(f"  {name:16s} {value}" for name, value in vars(args).items()))

    def save(step):  # a self-describing checkpoint (sample.py needs nothing else), written atomically
        save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "config": dataclasses.asdict(config), "args": vars(args),
                         "losses": losses[:step].cpu()}, ckpt_path)

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

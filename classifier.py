"""Classifier guidance beside classifier-free guidance: a noise-conditional classifier p_φ(c | z_λ).

Ho & Salimans (arXiv 2207.12598) read classifier-free guidance as classifier guidance of the
unconditional model with the *implicit* classifier p^i(c | z_λ) ∝ p(z_λ | c) / p(z_λ). With
ε_θ(z_λ) ≈ −σ_λ ∇_z log p(z_λ), Bayes gives ∇_z log p^i(c | z_λ) = −(1/σ_λ) [ε(z_λ, c) − ε(z_λ)], so

    ε̃ = ε_θ(z_λ) + (1 + w) [ε_θ(z_λ, c) − ε_θ(z_λ)] = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p^i(c | z_λ)

(Algorithm 2, line 3, = sample.guided_eps). Classifier guidance (Dhariwal & Nichol 2021, "ADM")
puts a trained noise-conditional classifier p_φ(c | z_λ) in place of p^i, on the same w axis:

    ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)                base "uncond" (Dhariwal & Nichol)
    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)                    base "cond" (the paper's equation
                                                                    for guiding a conditional model)

1 + w is Dhariwal & Nichol's classifier scale s: their s = 1 on the unconditional model is w = 0 here,
the same strength as CFG at w = 0 (the conditional model). With exact scores and the exact classifier
both forms equal CFG's ε̃ = (1 + w) ε(z_λ, c) − w ε(z_λ) (tests/test_classifier.py checks this on a
toy at every λ). The gradient is taken by autograd through p_φ (`classifier_guided_eps`); it is a rule
that sample.sample takes, with every sampler:

    rule = functools.partial(classifier_guided_eps, classifier=clf, base="uncond")
    x = sample.sample(model, labels, w, guidance=rule)

The classifier (`NoisyClassifier`) is ADM's design at this project's scale: the U-Net's down path and
middle, built from model.py's blocks and conditioned on λ as the U-Net is (a sinusoidal embedding of
u(λ) and an MLP, added in every residual block), then GroupNorm → SiLU → average pool → linear (ADM's
"adaptive" pooling; its ImageNet classifiers used attention pooling and scale-shift normalisation).
It is trained with cross-entropy on z_λ ~ q(z_λ | x), λ drawn from the diffusion model's training
density (train.sample_logsnr), with AdamW, a linearly annealed learning rate and an EMA of the weights;
its accuracy is reported per band of λ on held-out images (chance at low λ, near clean accuracy at high).

    python classifier.py --dataset digits                                      # offline, minutes on a CPU
    python classifier.py --dataset mnist --data-dir ../shared/data/mnist-4k    # -> out/classifier-noisy/mnist/ckpt.pt
    python sample.py --ckpt out/mnist/ckpt.pt --guidance classifier \
        --classifier-ckpt out/classifier-noisy/mnist/ckpt.pt --w 0 1 3

Held-out images (metrics.load_splits): the last 200 per class of mnist's training split (the same images
train.py leaves out, so the classifier never trains on the metrics' reference images), the test split of
fashion-mnist and cifar10, and for digits (no test split) the last 20 per class.
"""
import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DATASETS, HOLDOUT, DataError, to_model_range
from metrics import load_splits
from model import (Block, CheckpointError, Downsample, group_norm, load_checkpoint, logsnr_to_unit,
                   save_checkpoint, sinusoidal_embedding, zero_init)
from schedule import alpha_sigma, q_sample
from train import epoch_permutation, number, sample_logsnr, step_seed, update_ema


# ------------------------------------------------------------------ the classifier p_φ(c | z_λ)

@dataclass
class ClassifierConfig:
    image_size: int = 32  # H = W of the input z_λ
    in_channels: int = 3  # C of the input
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per level (ADM's "classifier_depth")
    attention_resolutions: tuple = (16,)  # resolutions (H) that get self-attention
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 10  # the classes c = 0..num_classes−1 (no null label: p_φ always names a class)


PRESETS = {
    # U-Net down paths with one residual block per level. The 28×28 one is the down path of the earlier
    # 32-channel mnist U-Net: 1.16M parameters, larger than today's 0.69M mnist preset (notebook 04 measures
    # what its gradient costs per sampling step against CFG's second evaluation).
    "digits": ClassifierConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,)),
    "mnist": ClassifierConfig(image_size=28, in_channels=1, channels=32, channel_mult=(1, 2, 4),
                              num_res_blocks=1, attention_resolutions=(7,)),
    # The DDPM CIFAR-10 U-Net's down path and middle (ADM's 128×128 classifier: width 128, depth 2).
    "cifar10": ClassifierConfig(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                                num_res_blocks=2, attention_resolutions=(16,)),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]


class NoisyClassifier(nn.Module):
    """p_φ(c | z_λ): forward(z, logsnr) -> logits (B, num_classes); log_softmax of them is log p_φ(c | z_λ)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        ch, emb_dim = config.channels, 4 * config.channels
        self.logsnr_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # The U-Net's down path (model.UNet), without the skip connections.
        self.down = nn.ModuleList()
        res, cur = config.image_size, ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(Block(cur, ch * mult, emb_dim, config.dropout,
                                       res in config.attention_resolutions, config.num_heads))
                cur = ch * mult
            if level < len(config.channel_mult) - 1:
                self.down.append(Downsample(cur))
                res = (res + 1) // 2
        self.mid = nn.ModuleList([Block(cur, cur, emb_dim, config.dropout, True, config.num_heads),
                                  Block(cur, cur, emb_dim, config.dropout, False, config.num_heads)])

        # ADM's pooled head: GroupNorm → SiLU → average over H, W → linear (zero-initialised, as ADM's).
        self.norm_out = group_norm(cur)
        self.head = zero_init(nn.Linear(cur, config.num_classes))

    def forward(self, z, logsnr):
        """z: (B, C, H, W); logsnr: (B,) or scalar λ -> logits (B, num_classes)."""
        logsnr = torch.as_tensor(logsnr, device=z.device, dtype=torch.float32).expand(z.shape[0])
        # λ enters exactly as in model.UNet; .to(z.dtype) lets the network run in float64 (tests).
        emb = self.logsnr_mlp(sinusoidal_embedding(1000 * logsnr_to_unit(logsnr), self.config.channels).to(z.dtype))
        h = self.conv_in(z)
        for module in [*self.down, *self.mid]:
            h = module(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return self.head(h)  # (B, num_classes)


# ------------------------------------------------------------------ classifier guidance: a rule for sample()

def classifier_grad(classifier, z, logsnr, labels):
    """∇_z log p_φ(c | z_λ), the shape of z, by autograd; works inside torch.no_grad (as sample() runs),
    not inside torch.inference_mode.

    The gradient of Σ_b log p_φ(c_b | z_b) with respect to z_b is that of row b alone, because the rows
    do not interact: the classifier must be in eval mode (no batch statistics, no dropout)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(z, logsnr), dim=1)  # (B, K): log p_φ(c | z_λ) for every c
        log_p_c = log_p.gather(1, labels[:, None]).sum()  # Σ_b log p_φ(c_b | z_b)
        return torch.autograd.grad(log_p_c, z)[0]


def classifier_guided_eps(model, z, logsnr, labels, w, *, classifier, base="uncond"):
    """Classifier guidance (Dhariwal & Nichol) on the paper's w axis, as a rule for sample.sample:

        base "uncond":  ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)     (1 + w = D&N's scale s)
        base "cond":    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)

    model: ε_θ with a null label (model.null_label = ∅); classifier: p_φ, forward(z, logsnr) -> logits.
    Bind the last two with functools.partial to get the rule's signature (model, z, logsnr, labels, w).
    w: a number, or (B,) with one w per example. Where the classifier's factor (1 + w, or w) is zero
    everywhere, only the one pass of ε_θ runs."""
    if base not in ("uncond", "cond"):
        raise ValueError(f"unknown base {base!r}: use 'uncond' (ε_θ(z_λ)) or 'cond' (ε_θ(z_λ, c))")
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    scale = 1 + w if base == "uncond" else w  # the factor of −σ_λ ∇_z log p_φ
    eps = model(z, logsnr, torch.full_like(labels, model.null_label) if base == "uncond" else labels)
    if not scale.any():
        return eps
    if scale.ndim == 1:
        scale = scale.reshape(-1, *[1] * (z.ndim - 1))  # (B,) -> (B, 1, 1, 1)
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    sigma = alpha_sigma(logsnr)[1].to(z.dtype).reshape(-1, *[1] * (z.ndim - 1))  # σ_λ, (B, 1, 1, 1)
    return eps - scale * sigma * classifier_grad(classifier, z, logsnr, labels)


# ------------------------------------------------------------------ training and evaluation (pure functions)

def classifier_loss(classifier, x, labels, schedule="cosine", generator=None):
    """Cross-entropy of p_φ(c | z_λ) on z_λ ~ q(z_λ | x), λ from the diffusion model's training density
    (train.sample_logsnr); draws B uniforms for λ, then ε of x's shape, from `generator`."""
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    z = q_sample(x, logsnr, eps)  # z_λ = α_λ x + σ_λ ε
    return F.cross_entropy(classifier(z, logsnr), labels)


BANDS = ((-20, -5), (-5, -2), (-2, 0), (0, 2), (2, 5), (5, 20))  # λ bands of the accuracy report


@torch.no_grad()
def band_accuracy(classifier, images, labels, bands=BANDS, seed=0, batch_size=500):
    """Accuracy of argmax_c p_φ(c | z_λ) on z_λ = α_λ x + σ_λ ε of uint8 images, λ uniform in each band.

    One (λ, ε) per image and band, from a generator seeded with `seed` (the same draws on every call).
    Returns a list of accuracies, one per band."""
    generator, device = torch.Generator().manual_seed(seed), next(classifier.parameters()).device
    result = []
    for lo, hi in bands:
        correct = 0
        for start in range(0, len(labels), batch_size):
            x = to_model_range(images[start:start + batch_size])  # (B, C, H, W) in [−1, 1]
            logsnr = lo + (hi - lo) * torch.rand(len(x), generator=generator)  # (B,) uniform in [lo, hi)
            z = q_sample(x, logsnr, torch.randn(x.shape, generator=generator))
            pred = classifier(z.to(device), logsnr.to(device)).argmax(dim=1).cpu()
            correct += (pred == labels[start:start + batch_size]).sum().item()
        result.append(correct / len(labels))
    return result


# ------------------------------------------------------------------ checkpoints

def classifier_from_checkpoint(ckpt, weights="ema"):
    """The NoisyClassifier described by ckpt['config'], loaded with ckpt[weights] ('ema' or 'model')."""
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    classifier = NoisyClassifier(config)
    classifier.load_state_dict(ckpt[weights])
    return classifier


def load_classifier(path, map_location="cpu"):
    """(NoisyClassifier with the EMA weights in eval mode, the checkpoint dict) from a file written by
    classifier.py; CheckpointError with a one-line reason otherwise (no pickled code runs)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no classifier checkpoint at {path}: train one with "
                              "`python classifier.py --dataset NAME`")
    ckpt = load_checkpoint(path, map_location)
    try:
        classifier = classifier_from_checkpoint(ckpt)
    except (TypeError, KeyError, RuntimeError) as e:  # a diffusion checkpoint, or weights that do not fit
        raise CheckpointError(f"{path} is not a noise-conditional classifier written by classifier.py "
                              f"({type(e).__name__})") from None
    return classifier.eval(), ckpt


# ------------------------------------------------------------------ the training script

# Per-dataset defaults; a flag given on the command line wins. cifar10 is ADM's classifier recipe
# (guided-diffusion README, ImageNet classifiers): AdamW, lr 3e-4 annealed linearly to 0, weight decay
# 0.05, batch 256, 300k steps. The CPU presets take a larger rate and minutes of training.
DATASET_DEFAULTS = {
    "digits": dict(batch_size=64, lr=1e-3, max_steps=1000, log_every=100, ckpt_every=500),
    "mnist": dict(batch_size=64, lr=1e-3, max_steps=2000, log_every=100, ckpt_every=500),
    "cifar10": dict(batch_size=256, lr=3e-4, max_steps=300_000, log_every=1000, ckpt_every=10_000),
}
DATASET_DEFAULTS["fashion-mnist"] = DATASET_DEFAULTS["mnist"]
# Images per class held out (metrics.load_splits: 0 means the test split): data.HOLDOUT (mnist 200, the
# metrics' reference images), and 20 per class of digits, which has no test split.
CLASSIFIER_HOLDOUT = {**HOLDOUT, "digits": 20}
WEIGHT_DECAY = 0.05  # AdamW (ADM)
EMA_DECAY = 0.9999  # ramped up as min(0.9999, (1 + step) / (10 + step)), as train.py's CPU presets


def fail(message):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"classifier.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Per-dataset defaults: " + "; ".join(
                                    f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                    for name, d in DATASET_DEFAULTS.items()))
    positive = number(int, 1)
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default="./data", help="where data.py finds or downloads the files")
    p.add_argument("--out-dir", default=None, help="default out/classifier-noisy/<dataset>")
    p.add_argument("--holdout", type=number(int, 0), help="images per class held out of training for the accuracy "
                   "report (default: " + ", ".join(f"{k} {v}" for k, v in CLASSIFIER_HOLDOUT.items())
                   + ", else 0: the test split, as metrics.load_splits)")
    p.add_argument("--max-steps", type=positive, help="training steps (per dataset)")
    p.add_argument("--batch-size", type=positive, help="images per step (per dataset)")
    p.add_argument("--lr", type=number(float, 0, low_inclusive=False),
                   help="peak AdamW learning rate (per dataset; ADM: 3e-4)")
    p.add_argument("--log-every", type=positive, help="steps between loss readings")
    p.add_argument("--ckpt-every", type=positive, help="steps between checkpoints")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.error = lambda message: fail(f"{message} (see python classifier.py --help)")
    args = p.parse_args(argv)
    for name, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.holdout is None:
        args.holdout = CLASSIFIER_HOLDOUT.get(args.dataset, 0)
    args.out_dir = args.out_dir or os.path.join("out", "classifier-noisy", args.dataset)
    return args


def main(argv=None):
    # -------------------------------------------------------------- settings
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available: use --device cpu")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as e:
        fail(f"cannot write to --out-dir {args.out_dir}: {e.strerror}; choose a writable folder")
    if os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: choose another --out-dir, or remove it to train again")

    # -------------------------------------------------------------- data: training and held-out images
    try:
        splits = load_splits(args.dataset, args.data_dir, args.holdout)
    except DataError as e:
        fail(str(e))
    (images, labels), (held_images, held_labels) = splits["train"], splits["held"]
    batches_per_epoch = len(labels) // args.batch_size
    if batches_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} training images of {args.dataset}")
    images, labels = images.to(device), labels.to(device)

    # -------------------------------------------------------------- classifier, EMA, optimizer
    config = PRESETS[args.dataset]
    torch.manual_seed(args.seed)
    classifier = NoisyClassifier(config).to(device)
    ema = copy.deepcopy(classifier).requires_grad_(False)  # the weights that guidance uses
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    print(f"classifier.py: {args.dataset}, {len(labels)} training images {tuple(images.shape[1:])}, held out: "
          f"{splits['held_name']}; NoisyClassifier {sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M "
          f"parameters, device {device}\n" + "\n".join(f"  {k:12s} {v}" for k, v in vars(args).items()))

    def save(step, accuracies):  # self-describing (sample.py needs nothing else), written atomically
        save_checkpoint({"config": dataclasses.asdict(config), "args": vars(args), "model": classifier.state_dict(),
                         "ema": ema.state_dict(), "step": step, "bands": [list(b) for b in BANDS],
                         "band_accuracy": accuracies}, ckpt_path)

    # -------------------------------------------------------------- the loop
    start, running, last_log = time.time(), 0.0, 0
    for step in range(args.max_steps):
        torch.manual_seed(step_seed(args.seed, step, 0))  # λ, ε and flips of this step
        epoch, i = divmod(step, batches_per_epoch)
        if i == 0:
            perm = epoch_permutation(len(labels), args.seed, epoch).to(device)
        idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
        x = to_model_range(images[idx])  # (B, C, H, W) in [−1, 1]
        if args.dataset == "cifar10":  # random horizontal flips (as train.py and ADM)
            flip = torch.rand(len(idx), device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in optimizer.param_groups:  # ADM's anneal_lr: linear decay to 0
            group["lr"] = args.lr * (1 - step / args.max_steps)
        loss = classifier_loss(classifier, x, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, classifier, min(EMA_DECAY, (1 + step) / (10 + step)))
        running += loss.detach()
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            mean_loss, running, last_log = running.item() / (done - last_log), 0.0, done
            if not math.isfinite(mean_loss):
                kept = (f"the last good checkpoint {ckpt_path} is untouched" if os.path.exists(ckpt_path)
                        else "nothing was saved")
                print(f"classifier.py: error: the loss became {mean_loss} by step {done}; stopped, and {kept} "
                      "(lower --lr)", file=sys.stderr)
                sys.exit(1)
            print(f"step {done:7d}/{args.max_steps}  cross-entropy {mean_loss:.4f}  ({time.time() - start:.0f} s)")
        if done % args.ckpt_every == 0 and done < args.max_steps:
            save(done, None)

    # -------------------------------------------------------------- accuracy per λ band on held-out images (EMA)
    accuracies = band_accuracy(ema.eval(), held_images, held_labels)
    save(args.max_steps, accuracies)
    print(f"accuracy of the EMA classifier on {splits['held_name']} (chance {1 / config.num_classes:.2f}):")
    for (lo, hi), acc in zip(BANDS, accuracies):
        print(f"  λ in [{lo:3d}, {hi:3d}{')' if hi < 20 else ']'}  {acc:.3f}")
    print(f"classifier.py: {args.max_steps} steps in {time.time() - start:.0f} s; saved {ckpt_path}")


if __name__ == "__main__":
    main()

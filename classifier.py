"""Training the noise-conditional classifier p_φ(c | z_λ) of classifier guidance, beside classifier-free guidance.

Ho & Salimans (arXiv 2207.12598) read classifier-free guidance as classifier guidance of the
unconditional model with the *implicit* classifier p^i(c | z_λ) ∝ p(z_λ | c) / p(z_λ). With
ε_θ(z_λ) ≈ −σ_λ ∇_z log p(z_λ), Bayes gives ∇_z log p^i(c | z_λ) = −(1/σ_λ) [ε(z_λ, c) − ε(z_λ)], so

    ε̃ = ε_θ(z_λ) + (1 + w) [ε_θ(z_λ, c) − ε_θ(z_λ)] = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p^i(c | z_λ)

(Algorithm 2, line 3, = guidance.guided_eps). Classifier guidance (Dhariwal & Nichol 2021, "ADM")
puts a trained noise-conditional classifier p_φ(c | z_λ) in place of p^i, on the same w axis:

    ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)                base "uncond" (Dhariwal & Nichol)
    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)                    base "cond" (the paper's equation
                                                                    for guiding a conditional model)

1 + w is Dhariwal & Nichol's classifier scale s: their s = 1 on the unconditional model is w = 0 here,
the same strength as CFG at w = 0 (the conditional model). With exact scores and the exact classifier
both forms equal CFG's ε̃ = (1 + w) ε(z_λ, c) − w ε(z_λ) (tests/test_classifier.py checks this on a
toy at every λ). The rule is guidance.classifier_guided_eps (line 3, beside the paper's), the network
model.NoisyClassifier: ADM's design at this project's scale, the U-Net's encoder (model.Encoder: the λ
embedding, the down path and the middle) and a pooled linear head. This file trains it: cross-entropy on
z_λ ~ q(z_λ | x), λ drawn from the diffusion model's training density (train.sample_logsnr), with AdamW, a
linearly annealed learning rate and an EMA of the weights; its accuracy is reported per band of λ on
held-out images (chance at low λ, near clean accuracy at high).

    python classifier.py --dataset digits                                      # offline, minutes on a CPU
    python classifier.py --dataset mnist --data-dir data/mnist-4k    # -> out/classifier-noisy/mnist/ckpt.pt
    python sample.py --ckpt out/mnist/ckpt.pt --guidance classifier \
        --guide-ckpt out/classifier-noisy/mnist/ckpt.pt --w 0 1 3

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

import torch
import torch.nn.functional as F

from data import DATASETS, HOLDOUT, DataError, to_model_range
from metrics import load_splits
from model import ClassifierConfig, NoisyClassifier, save_checkpoint
from schedule import q_sample
from train import epoch_permutation, number, sample_logsnr, step_seed, update_ema
from train import fail as train_fail

PRESETS = {
    # U-Net encoders with one residual block per level. The 28×28 one is the encoder of the earlier
    # 32-channel mnist U-Net: 1.16M parameters, larger than today's 0.69M mnist preset (notebook 04 measures
    # what its gradient costs per sampling step against CFG's second evaluation).
    "digits": ClassifierConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,)),
    "mnist": ClassifierConfig(image_size=28, in_channels=1, channels=32, channel_mult=(1, 2, 4),
                              num_res_blocks=1, attention_resolutions=(7,)),
    # The DDPM CIFAR-10 U-Net's encoder (ADM's 128×128 classifier: width 128, depth 2).
    "cifar10": ClassifierConfig(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                                num_res_blocks=2, attention_resolutions=(16,)),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]


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
    """Bad input: one line on stderr, exit code 2, no traceback (train.fail)."""
    train_fail(message, prog="classifier.py")


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
        save_checkpoint({"network": "classifier", "config": dataclasses.asdict(config), "args": vars(args),
                         "model": classifier.state_dict(),
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

"""Training p_φ(c | z_λ), the noise-conditional classifier of classifier guidance.

Classifier guidance (Dhariwal & Nichol 2021) puts a trained classifier where CFG has the implicit
one, p^i(c | z_λ) ∝ p(z_λ | c) / p(z_λ), on the paper's w axis (guidance.classifier_guided_eps):

    ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)   base "uncond" (Dhariwal & Nichol: s = 1 + w)
    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)           base "cond" (the paper's equation)

With exact scores and the exact classifier both equal CFG's ε̃ (tests/test_noisy_classifier.py). The
network is model.NoisyClassifier (ADM's: the U-Net's encoder and a pooled head), its size and
recipe the dataset's preset's `guide` (presets.py). Cross-entropy on z_λ ~ q(z_λ | x) with λ from
the diffusion model's training density, AdamW with the rate annealed to 0, an EMA of the weights;
accuracy is reported per band of λ on held-out images (metrics.load_splits).

    python noisy_classifier.py --dataset digits          # offline, minutes on a CPU
    python noisy_classifier.py --dataset mnist --data-dir DIR  # out/classifier-noisy/mnist/ckpt.pt
    python sample.py --ckpt out/mnist/ckpt.pt --guidance classifier \
        --guide-ckpt out/classifier-noisy/mnist/ckpt.pt --w 0 1 3
"""
import copy
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import cli
import data
from metrics import load_splits
from model import NoisyClassifier, save_checkpoint
from presets import PRESETS
from schedule import q_sample
from train import epoch_permutation, random_flips, sample_logsnr, step_seed, update_ema

fail = functools.partial(cli.fail, prog="noisy_classifier.py")
WEIGHT_DECAY = 0.05  # AdamW (ADM)
EMA_DECAY = 0.9999  # ramped up as min(0.9999, (1 + step) / (10 + step)), as train.py's CPU presets
NO_TEST_SPLIT_HOLDOUT = 20  # images per class held out for the report, without a test split


# ------------------------------------------------------------------ training and evaluation

def classifier_loss(classifier, x, labels, schedule="cosine", generator=None):
    """Cross-entropy of p_φ(c | z_λ) on z_λ ~ q(z_λ | x), λ from the diffusion model's training
    density (train.sample_logsnr); draws B uniforms for λ, then ε, from `generator`."""
    logsnr = sample_logsnr(x.shape[0], schedule, generator, x.device)  # (B,)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    z = q_sample(x, logsnr, eps)  # z_λ = α_λ x + σ_λ ε
    return F.cross_entropy(classifier(z, logsnr), labels)


BANDS = ((-20, -5), (-5, -2), (-2, 0), (0, 2), (2, 5), (5, 20))  # λ bands of the accuracy report


@torch.no_grad()
def band_accuracy(classifier, images, labels, bands=BANDS, seed=0, batch_size=500):
    """Accuracy of argmax_c p_φ(c | z_λ) on z_λ = α_λ x + σ_λ ε of uint8 images, λ uniform in
    each band: a list, one per band. One (λ, ε) per image and band, from a generator seeded with
    `seed` (the same draws on every call)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(classifier.parameters()).device
    result = []
    for lo, hi in bands:
        correct = 0
        for start in range(0, len(labels), batch_size):
            x = data.to_model_range(images[start:start + batch_size])  # (B, C, H, W)
            logsnr = lo + (hi - lo) * torch.rand(len(x), generator=generator)  # (B,) in [lo, hi)
            z = q_sample(x, logsnr, torch.randn(x.shape, generator=generator))
            pred = classifier(z.to(device), logsnr.to(device)).argmax(dim=1).cpu()
            correct += (pred == labels[start:start + batch_size]).sum().item()
        result.append(correct / len(labels))
    return result


# ------------------------------------------------------------------ the training script

def parse_args(argv=None):
    recipes = [f"{name}: {PRESETS[d.preset].guide_recipe}" for name, d in data.DATASETS.items()]
    p = cli.parser("noisy_classifier.py", __doc__,
                   epilog="Recipes (presets.py): " + "; ".join(recipes))
    positive = cli.number(int, 1)
    p.add_argument("--dataset", default="digits", choices=list(data.DATASETS))
    p.add_argument("--data-dir", default="./data", help="where data.py finds the files")
    p.add_argument("--out-dir", default=None, help="default out/classifier-noisy/<dataset>")
    p.add_argument("--holdout", type=cli.number(int, 0), help="images per class held out for the "
                   "accuracy report (default the dataset's; 0: its test split; without one, "
                   f"{NO_TEST_SPLIT_HOLDOUT})")
    p.add_argument("--max-steps", type=positive, help="training steps")
    p.add_argument("--batch-size", type=positive, help="images per step")
    p.add_argument("--lr", type=cli.number(float, 0, low_inclusive=False),
                   help="peak AdamW learning rate (ADM: 3e-4)")
    p.add_argument("--log-every", type=positive, help="steps between loss readings")
    p.add_argument("--ckpt-every", type=positive, help="steps between checkpoints")
    p.add_argument("--seed", type=cli.number(int, 0), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dataset = data.DATASETS[args.dataset]
    recipe = PRESETS[dataset.preset].guide_recipe
    if recipe is None:
        fail(f"preset {dataset.preset} (of {args.dataset}) has no p_φ: give it a guide and a "
             "guide_recipe in presets.py")
    for field in dataclasses.fields(recipe):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(recipe, field.name))
    if args.holdout is None:
        args.holdout = dataset.holdout or (0 if dataset.test_split else NO_TEST_SPLIT_HOLDOUT)
    args.out_dir = args.out_dir or os.path.join("out", "classifier-noisy", args.dataset)
    return args


def main(argv=None):
    # -------------------------------------------------------------- settings
    args = parse_args(argv)
    device = cli.device(args.device, fail)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as e:
        fail(f"cannot write to --out-dir {args.out_dir}: {e.strerror}; choose a writable folder")
    if os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: choose another --out-dir, or remove it to train again")

    # -------------------------------------------------------------- data: training and held-out
    try:
        splits = load_splits(args.dataset, args.data_dir, args.holdout)
    except data.DataError as e:
        fail(str(e))
    (images, labels), (held_images, held_labels) = splits["train"], splits["held"]
    batches_per_epoch = len(labels) // args.batch_size
    if batches_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(labels)} training images "
             f"of {args.dataset}")
    images, labels = images.to(device), labels.to(device)

    # -------------------------------------------------------------- classifier, EMA, optimizer
    config = PRESETS[data.DATASETS[args.dataset].preset].guide
    torch.manual_seed(args.seed)
    classifier = NoisyClassifier(config).to(device)
    ema = copy.deepcopy(classifier).requires_grad_(False)  # the weights that guidance uses
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    n_params = sum(p.numel() for p in classifier.parameters()) / 1e6
    print(f"noisy_classifier.py: {args.dataset}, {len(labels)} training images "
          f"{tuple(images.shape[1:])}, held out: {splits['held_name']}; NoisyClassifier "
          f"{n_params:.2f}M parameters, device {device}\n"
          + "\n".join(f"  {k:12s} {v}" for k, v in vars(args).items()))

    def save(step, accuracies):  # self-describing (sample.py needs nothing else), atomic
        save_checkpoint({"network": "classifier", "config": dataclasses.asdict(config),
                         "args": vars(args), "model": classifier.state_dict(),
                         "ema": ema.state_dict(), "step": step, "bands": [list(b) for b in BANDS],
                         "band_accuracy": accuracies}, ckpt_path)

    # -------------------------------------------------------------- the loop
    # Not train.py's loop nor metric_nets.py's (_fit): p_φ sees noised z_λ with per-step seeds
    # like train.py, but no label dropout, no warm-up and a linearly annealed rate; the metric
    # networks see clean images in epochs. One loop for the three would be a loop of switches.
    start, running, last_log = time.time(), 0.0, 0
    for step in range(args.max_steps):
        torch.manual_seed(step_seed(args.seed, step, 0))  # λ, ε and flips of this step
        epoch, i = divmod(step, batches_per_epoch)
        if i == 0:
            perm = epoch_permutation(len(labels), args.seed, epoch).to(device)
        idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
        x = data.to_model_range(images[idx])  # (B, C, H, W) in [−1, 1]
        x = random_flips(x) if data.DATASETS[args.dataset].flips else x  # as train.py (ADM)
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
                kept = (f"the last good checkpoint {ckpt_path} is untouched"
                        if os.path.exists(ckpt_path) else "nothing was saved")
                print(f"noisy_classifier.py: error: the loss became {mean_loss} by step {done}; "
                      f"stopped, and {kept} (lower --lr)", file=sys.stderr)
                sys.exit(1)
            seconds = time.time() - start
            print(f"step {done:7d}/{args.max_steps}  cross-entropy {mean_loss:.4f}  "
                  f"({seconds:.0f} s)")
        if done % args.ckpt_every == 0 and done < args.max_steps:
            save(done, None)

    # -------------------------------------------------------------- accuracy per λ band (EMA)
    accuracies = band_accuracy(ema.eval(), held_images, held_labels)
    save(args.max_steps, accuracies)
    chance = 1 / config.num_classes
    print(f"accuracy of the EMA classifier on {splits['held_name']} (chance {chance:.2f}):")
    for (lo, hi), acc in zip(BANDS, accuracies):
        print(f"  λ in [{lo:3d}, {hi:3d}{')' if hi < 20 else ']'}  {acc:.3f}")
    seconds = time.time() - start
    print(f"noisy_classifier.py: {args.max_steps} steps in {seconds:.0f} s; saved {ckpt_path}")


if __name__ == "__main__":
    main()

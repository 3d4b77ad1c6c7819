"""The networks that metrics.py measures samples with, how each is trained, and their files.

One per kind of dataset (`data.DATASETS[name].judge` names it):
- `Classifier`: a small CNN for the MNIST family (28×28 digits have no standard network), trained
  with Adam and random translations (`train_classifier`).
- `CifarClassifier`: a ResNet-9-style CNN with BatchNorm for CIFAR-10 (32×32 RGB), trained with
  SGD, a one-cycle learning rate, label smoothing, random crops and flips
  (`train_cifar_classifier`).
Each gives its penultimate features (`features`) for a "classifier FID" and its logits (`head`) for
a "classifier IS" and the class accuracy of conditional samples.

These are NOT Inception: their numbers depend on the network and its training run and compare only
with each other, within this project (same classifier file), never with published FID/IS. Nor are
they classifier guidance's p_φ(c | z_λ), which sees noised images: that is model.NoisyClassifier,
trained by noisy_classifier.py. These see clean images only.

A file (`save_classifier`) records its "arch" and config; files without an "arch" hold a Classifier.
    python metrics.py train-classifier --dataset mnist --data-dir DIR     # out/classifier/mnist.pt
    python metrics.py train-classifier --dataset cifar10 --data-dir DIR [--device cuda]
Where none has been trained, `classifier_path` falls back to the shipped checkpoints/metrics-*.pt.
How long each takes, and the accuracy it reaches: docs/results.md.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import SHIPPED_DIR, CheckpointError, checkpoint_path, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))


class Classifier(nn.Module):
    """A small CNN: three 3×3 convs (two with stride 2), a 128-d feature layer, a linear head."""

    def __init__(self, in_channels=1, image_size=28, num_classes=10, feature_dim=128):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size,
                           num_classes=num_classes, feature_dim=feature_dim)
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # H -> ceil(H/2)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # -> ceil(H/4)
        )
        size = (image_size + 3) // 4
        self.fc = nn.Linear(64 * size * size, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """x: (B, C, H, W) in [-1, 1] -> (B, feature_dim), the penultimate activations."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x):
        """x: (B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.dropout(self.features(x)))


def conv_bn(c_in, c_out):
    """3×3 convolution, BatchNorm, ReLU (no convolution bias: BatchNorm's shift takes its place)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + f(x), f being two conv_bn layers of x's width."""

    def __init__(self, channels):
        super().__init__()
        self.f = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.f(x)


class CifarClassifier(nn.Module):
    """The CIFAR-10 classifier: ResNet-9 (Page's DAWNBench network) at half its width, BatchNorm.

    widths (a, b, c, d) = (32, 64, 128, 256): conv_bn to a at 32×32; conv_bn to b and 2×2 max pool
    (16×16), a residual block; conv_bn to c and pool (8×8); conv_bn to d and pool (4×4), a residual
    block; the mean over the 4×4 positions is the d-dimensional feature layer (FID's features), and
    a linear head (`head`) gives the logits. Half of the original width (64, ..., 512) costs a
    quarter of its computation: it trains to the accuracy wanted here in the time a CPU affords.
    The image size is free (a multiple of 8).
    """
    WIDTHS = (32, 64, 128, 256)
    LOGIT_SCALE = 0.125

    def __init__(self, in_channels=3, num_classes=10, widths=WIDTHS):
        super().__init__()
        a, b, c, d = widths
        self.config = dict(in_channels=in_channels, num_classes=num_classes, widths=list(widths))
        self.convs = nn.Sequential(
            conv_bn(in_channels, a),                           # (B, a, H, W)
            conv_bn(a, b), nn.MaxPool2d(2), Residual(b),       # (B, b, H/2, W/2)
            conv_bn(b, c), nn.MaxPool2d(2),                    # (B, c, H/4, W/4)
            conv_bn(c, d), nn.MaxPool2d(2), Residual(d),       # (B, d, H/8, W/8)
        )
        self.fc = nn.Linear(d, num_classes)

    def features(self, x):
        """x: (B, C, H, W) in [-1, 1] -> (B, d): the penultimate activations, averaged over H, W."""
        return self.convs(x).mean(dim=(2, 3))

    def head(self, h):
        """(B, d) features -> (B, num_classes) logits: a linear layer whose output is scaled by 1/8,
        as in Page's network. The d features are all positive, so an unscaled head swings the
        logits of every image together at SGD's learning rates and training starts by
        overshooting."""
        return self.fc(h) * self.LOGIT_SCALE

    def forward(self, x):
        """x: (B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(x))


# The architectures a classifier file can hold (its "arch"; files without one hold a Classifier)
ARCHITECTURES = {"Classifier": Classifier, "CifarClassifier": CifarClassifier}
# The CIFAR-10 recipe's passes over the 50,000 training images: as many as a CPU run affords
# (docs/results.md, "The CIFAR-10 metrics classifier"); more would still gain a little accuracy
CIFAR_EPOCHS = 12


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def random_shift(x, max_shift, generator=None):
    """Translate each image (B, C, H, W) by up to `max_shift` pixels each way, filling with −1.

    Equivalent to padding by max_shift and cropping H × W at a random offset (the pad-and-crop of
    CIFAR training), done as one gather so that it costs little on a GPU too."""
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2 s, W + 2 s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    channel = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (B, C, H, W)


def random_flip(x, generator=None):
    """Mirror each image (B, C, H, W) left to right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def one_cycle(progress, warmup=0.25):
    """The one-cycle learning-rate shape (Smith & Topin 2017, as in Page's DAWNBench CIFAR-10 runs):
    a factor rising linearly from 0 to 1 over the first `warmup` fraction of training, then falling
    linearly to 0."""
    return min(progress / warmup, (1 - progress) / (1 - warmup))


def _fit(clf, optimizer, images, labels, epochs, batch_size, augment, generator, device, log,
         lr_at=None, label_smoothing=0.0):
    """The training loop of both classifiers: `epochs` passes over uint8 images (N, C, H, W) and
    labels (N,) in a random order drawn from `generator`, each batch passed through `augment`,
    cross-entropy (with `label_smoothing`), and the learning rate set to lr_at(fraction of training
    done) before each step when lr_at is given. Logs each epoch's mean loss and seconds; returns
    clf in eval mode."""
    x_all, y_all = data.to_model_range(images).to(device), labels.to(device)
    steps_per_epoch = -(-len(x_all) // batch_size)
    for epoch in range(epochs):
        clf.train()
        start, total = time.time(), 0.0
        order = torch.randperm(len(x_all), generator=generator)
        for i, first in enumerate(range(0, len(order), batch_size)):
            if lr_at is not None:
                progress = (epoch * steps_per_epoch + i) / (epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress)
            idx = order[first:first + batch_size]
            logits = clf(augment(x_all[idx]))
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}  train loss {total / len(order):.4f}  "
            f"{time.time() - start:.0f} s")
    return clf.eval()


def train_classifier(images, labels, epochs=40, batch_size=128, lr=1e-3, max_shift=2, seed=0,
                     device="cpu", log=print):
    """Train a `Classifier` (the MNIST family's) with Adam on uint8 images (N, C, H, W) and int64
    labels (N,), augmenting with random translations of up to `max_shift` pixels."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(in_channels=images.shape[1], image_size=images.shape[2],
                     num_classes=int(labels.max()) + 1).to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr)
    return _fit(clf, optimizer, images, labels, epochs, batch_size,
                lambda x: random_shift(x, max_shift, generator), generator, device, log)


def train_cifar_classifier(images, labels, epochs=CIFAR_EPOCHS, batch_size=128, lr=0.2,
                           weight_decay=5e-4, label_smoothing=0.1, widths=CifarClassifier.WIDTHS,
                           seed=0, device="cpu", log=print):
    """Train a `CifarClassifier` on uint8 images (N, 3, 32, 32) and int64 labels (N,): SGD with
    Nesterov momentum 0.9 and weight decay, the one-cycle learning rate peaking at `lr`, label
    smoothing, and as augmentation a random translation by up to 4 pixels (pad 4 and crop 32 × 32)
    and a horizontal flip. Batch 128 and weight decay 5e-4 are the usual CIFAR ResNet settings
    (He et al. 2016); the peak lr 0.2 is twice their 0.1, which the 1/8 logit scale of
    `CifarClassifier.head` allows and which learns faster in a short run; label smoothing 0.1 as in
    Szegedy et al. 2016."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # channels_last: the layout in which CPU (oneDNN) convolutions run fastest; same results
    clf = CifarClassifier(images.shape[1], int(labels.max()) + 1, widths)
    clf = clf.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)

    def augment(x):
        x = random_flip(random_shift(x, 4, generator), generator)
        return x.contiguous(memory_format=torch.channels_last)
    return _fit(clf, optimizer, images, labels, epochs, batch_size, augment, generator, device, log,
                lr_at=lambda progress: lr * one_cycle(progress), label_smoothing=label_smoothing)


# How each network is trained (data.Dataset.judge names one per dataset)
TRAINING = {"Classifier": train_classifier, "CifarClassifier": train_cifar_classifier}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def default_classifier_path(dataset):
    """Where `train-classifier` saves and the notebooks look: <repo>/out/classifier/<dataset>.pt."""
    return os.path.join(REPO, "out", "classifier", f"{dataset}.pt")


def classifier_path(dataset, given=None):
    """The metrics classifier to use: `given` (a path, or a shipped model's name), else the one
    `train-classifier` wrote, else the shipped checkpoints/metrics-<dataset>.pt (said on stderr),
    else the trained one's path, whose absence load_classifier reports."""
    if given:
        return checkpoint_path(given)
    trained, shipped = (default_classifier_path(dataset),
                        os.path.join(SHIPPED_DIR, f"metrics-{dataset}.pt"))
    if os.path.isfile(trained) or not os.path.isfile(shipped):
        return trained
    print(f"no classifier at {os.path.relpath(trained)}: using the shipped "
          f"{os.path.relpath(shipped)} (checkpoints/README.md)", file=sys.stderr)
    return shipped


def save_classifier(clf, path, **info):
    """Write the classifier's weights, architecture, config and `info` (plain values) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = dict(model=clf.state_dict(), arch=type(clf).__name__, config=dict(clf.config), **info)
    save_checkpoint(ckpt, path)


def load_classifier(path, map_location="cpu", dataset=None):
    """The classifier stored at `path` (read with weights_only=True), in eval mode: a `Classifier`
    or a `CifarClassifier`, as its file says (files without an "arch" hold a Classifier).

    Raises CheckpointError with a one-line message when the file is missing or unusable, or, with
    `dataset` given, when the file says it was trained on another dataset.
    """
    train_hint = ("`python metrics.py train-classifier "
                  f"--dataset {dataset or 'mnist'} --data-dir DIR`")
    path = checkpoint_path(path)  # a shipped classifier's name works as its path
    if not os.path.isfile(path):
        raise CheckpointError(f"no classifier at {path}: train one with {train_hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        clf = ARCHITECTURES[ckpt.get("arch", "Classifier")](**ckpt["config"])
        clf.load_state_dict(ckpt["model"])
    except Exception as e:  # unpickling, an unknown architecture, missing keys, mismatched shapes
        raise CheckpointError(f"{path} is not a classifier written by `metrics.py train-classifier`"
                              f" ({type(e).__name__}); train it again") from None
    if dataset is not None and ckpt.get("dataset", dataset) != dataset:
        raise CheckpointError(f"{path} is a classifier of {ckpt['dataset']}, not {dataset}: pass "
                              f"--classifier with one of {dataset}, or train one with {train_hint}")
    return clf.eval()

"""Sample-quality metrics: Fréchet distance, Inception Score, the project's classifiers, Inception (torch-fidelity).

The paper (Ho & Salimans, arXiv 2207.12598, section 4) measures the trade-off that guidance
strength w controls with two numbers computed on 50k samples:

    FID = ‖μ_a − μ_b‖² + tr(C_a) + tr(C_b) − 2 tr((C_a^{1/2} C_b C_a^{1/2})^{1/2})
          the Fréchet (2-Wasserstein) distance between Gaussians fitted to the features of
          generated and real images (lower = closer to the data: diversity and fidelity)
    IS  = exp E_x[ KL(p(y|x) ‖ p(y)) ],   p(y) = E_x p(y|x)
          high when every sample is confidently one class and the classes are balanced

FID falls for small w and then rises; IS rises monotonically with w (Tables 1 and 2).

What is here:
- `frechet_distance`, `frechet_distance_from_moments`, `inception_score`: pure functions in
  float64. The matrix square root goes through two symmetric eigendecompositions, which stay
  finite and accurate when a covariance is singular or nearly so (fewer samples than
  feature dimensions, dead features); no scipy needed.
- The project's metrics classifiers, one per kind of dataset, each trained here: `Classifier`, a
  small CNN for the MNIST family (28×28 digits have no standard network), and `CifarClassifier`,
  a ResNet-9-style CNN with BatchNorm for CIFAR-10 (32×32 RGB). Each gives its penultimate
  features (128-d, 256-d) for a "classifier FID", its softmax for a "classifier IS", and its
  argmax for the class accuracy of conditional samples (did the sampler draw the class it was
  asked for?). THESE ARE NOT INCEPTION NUMBERS: they depend on the classifier and its training
  run, and compare only with each other, within this project (same classifier file), never with
  published FID/IS values. CIFAR-10 read from JPEG files (the image-folder layout of data.py)
  differs from the official pixels, so its figures differ again from those on the official files.
- CIFAR-10 with Inception (`--inception`): the standard Inception-v3 FID and IS against the
  CIFAR-10 training set, through torch-fidelity (the exact port of the original TensorFlow
  network; `pip install torch-fidelity`, imported only when used; it downloads its weights on
  first use). Comparable with published numbers.

Commands (DIR: the data folder, as for train.py):
    python metrics.py train-classifier --dataset mnist --data-dir DIR
        trains the MNIST-family classifier (minutes on 2 CPU cores) and saves it to
        out/classifier/mnist.pt, leaving out the held-out images (`load_splits`), on which it
        reports its accuracy.
    python metrics.py train-classifier --dataset cifar10 --data-dir DIR [--device cuda]
        trains the CIFAR-10 classifier on the 50,000 training images (SGD with Nesterov momentum,
        a one-cycle learning rate, label smoothing, random crops and flips; tens of minutes on
        2 CPU cores, minutes on a GPU) and reports its accuracy on the 10,000 test images.
    python metrics.py mnist --npz samples.npz --dataset mnist --data-dir DIR
    python metrics.py cifar10 --npz samples.npz --data-dir DIR
        the classifier's FID / IS / class accuracy of samples written by `sample.py --npz`, per w,
        against half of the held-out real images, and the real-data floor from the other half.
    python metrics.py cifar10 --npz samples.npz --inception
        Inception FID / IS of the samples, per w (torch-fidelity).

Held-out real images (`load_splits`): FID against the training images could be won by a model
that memorised them, so the reference is real images nothing was trained on: the test split
(t10k; CIFAR-10's test_batch or test/ folder) where there is one, else the last --holdout images
of each class (mnist: 200 per class, data.DATASETS[name].holdout), which `python train.py --dataset mnist`
leaves out of training by the same rule.
"""
import argparse
import inspect
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import CheckpointError, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------
# Fréchet distance and Inception Score (pure functions, float64)
# --------------------------------------------------------------------------------------------

def _float64(x):
    """A numpy float64 copy of a numpy array or torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigh.

    Eigenvalues that round-off pushed below zero are set to zero, so a singular covariance
    gives a finite, real answer (scipy.linalg.sqrtm can return complex or inf there).
    """
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def feature_statistics(feats):
    """(N, D) features -> (μ (D,), C (D, D)): the mean and unbiased covariance, in float64."""
    feats = _float64(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b):
    """‖μ_a − μ_b‖² + tr C_a + tr C_b − 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2}, in float64.

    C_a^{1/2} C_b C_a^{1/2} = (C_a^{1/2} C_b^{1/2})(C_a^{1/2} C_b^{1/2})ᵀ, so the trace of its square
    root is the sum of the singular values of C_a^{1/2} C_b^{1/2}. Taking singular values (rather
    than square roots of eigenvalues) keeps the error at round-off level when the covariances are
    singular: the square root of a round-off eigenvalue of 1e-16 would add 1e-8 per dimension.
    """
    mu_a, cov_a, mu_b, cov_b = (_float64(t) for t in (mu_a, cov_a, mu_b, cov_b))
    tr_covmean = np.linalg.svd(_sqrt_psd(cov_a) @ _sqrt_psd(cov_b), compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def frechet_distance(feats_a, feats_b):
    """FID between two feature sets (N_a, D) and (N_b, D): the Fréchet distance of their Gaussian fits."""
    return frechet_distance_from_moments(*feature_statistics(feats_a), *feature_statistics(feats_b))


def inception_score(probs, splits=10, shuffle_seed=0):
    """IS = exp E_x[KL(p(y|x) ‖ p(y))] on each of `splits` equal chunks -> (mean, std) over chunks.

    probs: (N, K) class probabilities p(y|x), rows summing to 1. p(y) is the mean row of each
    chunk. This is the original definition (Salimans et al. 2016), 10 splits by default.
    The rows are first put in a fixed random order (seed `shuffle_seed`; None keeps the given
    order), as torch-fidelity does: samples arrive sorted by class (sample.py writes them so),
    and chunks of one class each would score IS ≈ 1 however good the samples are.
    """
    probs = torch.as_tensor(_float64(probs))
    if probs.ndim != 2 or probs.shape[0] < splits:
        raise ValueError(f"probs must be (N, K) with N >= splits = {splits}, got shape {tuple(probs.shape)}")
    if shuffle_seed is not None:
        probs = probs[torch.randperm(len(probs), generator=torch.Generator().manual_seed(shuffle_seed))]
    scores = []
    n = probs.shape[0]
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]  # (n / splits, K)
        p_y = part.mean(dim=0, keepdim=True)  # (1, K)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, p_y)).sum(dim=1)  # 0 log 0 = 0
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# The project's metrics classifiers (NOT Inception: their numbers compare only within this project)
# --------------------------------------------------------------------------------------------

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
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + f(x), f being two conv_bn layers of x's width."""

    def __init__(self, channels):
        super().__init__()
        self.f = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.f(x)


class CifarClassifier(nn.Module):
    """The CIFAR-10 classifier: ResNet-9 (Page's DAWNBench network) at half its width, with BatchNorm.

    widths (a, b, c, d) = (32, 64, 128, 256): conv_bn to a at 32×32; conv_bn to b and 2×2 max pool (16×16),
    a residual block; conv_bn to c and pool (8×8); conv_bn to d and pool (4×4), a residual block; the mean
    over the 4×4 positions is the d-dimensional feature layer (FID's features), and a linear head (`head`) gives
    the logits. Half of the original width (64, ..., 512) costs a quarter of its computation: it trains to the
    accuracy wanted here in the time a CPU affords. The image size is free (a multiple of 8).
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
        """x: (B, C, H, W) in [-1, 1] -> (B, d), the penultimate activations (mean over positions)."""
        return self.convs(x).mean(dim=(2, 3))

    def head(self, h):
        """(B, d) features -> (B, num_classes) logits: a linear layer whose output is scaled by 1/8, as in Page's
        network. The d features are all positive, so an unscaled head swings the logits of every image together
        at SGD's learning rates and training starts by overshooting."""
        return self.fc(h) * self.LOGIT_SCALE

    def forward(self, x):
        """x: (B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(x))


# The architectures a classifier file can hold (its "arch"; files without one hold a Classifier)
ARCHITECTURES = {"Classifier": Classifier, "CifarClassifier": CifarClassifier}
# The CIFAR-10 recipe's passes over the 50,000 training images: as many as fit in under an hour on a 2-core
# CPU (measure the ms per step to size a run on another machine); more would still raise the accuracy a little
CIFAR_EPOCHS = 12


def _as_model_range(images):
    """uint8 images, or floats in model range [-1, 1] (as the sampler returns them), -> floats in [-1, 1].

    Floats are first quantised to uint8 exactly as a saved image would be, so generated and real
    images reach the classifier through the same pipeline.
    """
    if images.dtype != torch.uint8:
        images = data.to_uint8(images)
    return data.to_model_range(images)


@torch.no_grad()
def classifier_outputs(clf, images, batch_size=500):
    """(penultimate features (N, D), softmax probabilities (N, K)) of uint8 or [-1, 1] images (N, C, H, W)."""
    clf.eval()
    device = next(clf.parameters()).device
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = _as_model_range(images[start:start + batch_size]).to(device)
        h = clf.features(x)
        feats.append(h.cpu())
        probs.append(F.softmax(clf.head(h), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def classifier_features(clf, images, batch_size=500):
    """(N, D) penultimate features: the classifier's stand-in for Inception's pool3 features."""
    return classifier_outputs(clf, images, batch_size)[0]


def classifier_probs(clf, images, batch_size=500):
    """(N, K) softmax probabilities p(y|x)."""
    return classifier_outputs(clf, images, batch_size)[1]


def classifier_metrics(clf, images, labels, ref_feats, splits=10):
    """The project classifier's FID / IS / class accuracy of generated `images` asked to be of class `labels`.

    ref_feats: `classifier_features` of real images (the reference set for FID).
    Returns dict(fid, is, is_std, accuracy). Not Inception numbers: compare only within this
    project, with the same classifier file.
    """
    feats, probs = classifier_outputs(clf, images)
    is_mean, is_std = inception_score(probs, splits=splits)
    accuracy = (probs.argmax(dim=1) == torch.as_tensor(labels)).double().mean().item()
    return dict(fid=frechet_distance(feats, ref_feats), **{"is": is_mean}, is_std=is_std, accuracy=accuracy)




def random_shift(x, max_shift, generator=None):
    """Translate each image (B, C, H, W) by up to `max_shift` pixels each way, filling with −1 (black).

    Equivalent to padding by max_shift and cropping H × W at a random offset (the pad-and-crop of CIFAR
    training), done as one gather so that it costs little on a GPU too."""
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


def _fit(clf, optimizer, images, labels, epochs, batch_size, augment, generator, device, log,
         lr_at=None, label_smoothing=0.0):
    """The training loop of both classifiers: `epochs` passes over uint8 images (N, C, H, W) and labels (N,)
    in a random order drawn from `generator`, each batch passed through `augment`, cross-entropy (with
    `label_smoothing`), and the learning rate set to lr_at(fraction of training done) before each step when
    lr_at is given. Logs each epoch's mean loss and seconds; returns clf in eval mode."""
    x_all, y_all = data.to_model_range(images).to(device), labels.to(device)
    steps_per_epoch = -(-len(x_all) // batch_size)
    for epoch in range(epochs):
        clf.train()
        start, total = time.time(), 0.0
        order = torch.randperm(len(x_all), generator=generator)
        for i, first in enumerate(range(0, len(order), batch_size)):
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at((epoch * steps_per_epoch + i) / (epochs * steps_per_epoch))
            idx = order[first:first + batch_size]
            loss = F.cross_entropy(clf(augment(x_all[idx])), y_all[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}  train loss {total / len(order):.4f}  {time.time() - start:.0f} s")
    return clf.eval()


def train_classifier(images, labels, epochs=40, batch_size=128, lr=1e-3, max_shift=2, seed=0, device="cpu",
                     log=print):
    """Train a `Classifier` (the MNIST family's) with Adam on uint8 images (N, C, H, W) and int64 labels (N,),
    augmenting with random translations of up to `max_shift` pixels."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(in_channels=images.shape[1], image_size=images.shape[2],
                     num_classes=int(labels.max()) + 1).to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr)
    return _fit(clf, optimizer, images, labels, epochs, batch_size,
                lambda x: random_shift(x, max_shift, generator), generator, device, log)


def one_cycle(progress, warmup=0.25):
    """The one-cycle learning-rate shape (Smith & Topin 2017, as in Page's DAWNBench CIFAR-10 runs): a factor
    rising linearly from 0 to 1 over the first `warmup` fraction of training, then falling linearly to 0."""
    return min(progress / warmup, (1 - progress) / (1 - warmup))


def train_cifar_classifier(images, labels, epochs=CIFAR_EPOCHS, batch_size=128, lr=0.2, weight_decay=5e-4,
                           label_smoothing=0.1, widths=CifarClassifier.WIDTHS, seed=0, device="cpu", log=print):
    """Train a `CifarClassifier` on uint8 images (N, 3, 32, 32) and int64 labels (N,): SGD with Nesterov
    momentum 0.9 and weight decay, the one-cycle learning rate peaking at `lr`, label smoothing, and as
    augmentation a random translation by up to 4 pixels (pad 4 and crop 32 × 32) and a horizontal flip.
    Batch 128 and weight decay 5e-4 are the usual CIFAR ResNet settings (He et al. 2016); the peak lr 0.2 is
    twice their 0.1, which the 1/8 logit scale of `CifarClassifier.head` allows and which learns faster in a
    short run; label smoothing 0.1 as in Szegedy et al. 2016."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # channels_last: the memory layout in which CPU (oneDNN) convolutions run fastest; same results up to rounding
    clf = CifarClassifier(images.shape[1], int(labels.max()) + 1, widths).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)

    def augment(x):
        x = random_flip(random_shift(x, 4, generator), generator)
        return x.contiguous(memory_format=torch.channels_last)
    return _fit(clf, optimizer, images, labels, epochs, batch_size, augment, generator, device, log,
                lr_at=lambda progress: lr * one_cycle(progress), label_smoothing=label_smoothing)


# How each metric network is trained (data.Dataset.judge names one per dataset)
JUDGE_TRAINING = {"Classifier": train_classifier, "CifarClassifier": train_cifar_classifier}


def accuracy(clf, images, labels):
    """Fraction of images whose argmax class is the label."""
    return (classifier_probs(clf, images).argmax(dim=1) == labels).double().mean().item()


def default_classifier_path(dataset):
    """Where `train-classifier` saves and the notebooks look: <repo>/out/classifier/<dataset>.pt."""
    return os.path.join(REPO, "out", "classifier", f"{dataset}.pt")


def save_classifier(clf, path, **info):
    """Write the classifier's weights, architecture, config and `info` (plain values) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(dict(model=clf.state_dict(), arch=type(clf).__name__, config=dict(clf.config), **info), path)


def load_classifier(path, map_location="cpu", dataset=None):
    """The classifier stored at `path` (read with weights_only=True), in eval mode: a `Classifier` or a
    `CifarClassifier`, as its file says (files without an "arch" hold a Classifier).

    Raises CheckpointError with a one-line message when the file is missing or unusable, or, with `dataset`
    given, when the file says it was trained on another dataset.
    """
    train_hint = f"`python metrics.py train-classifier --dataset {dataset or 'mnist'} --data-dir DIR`"
    if not os.path.isfile(path):
        raise CheckpointError(f"no classifier at {path}: train one with {train_hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        clf = ARCHITECTURES[ckpt.get("arch", "Classifier")](**ckpt["config"])
        clf.load_state_dict(ckpt["model"])
    except Exception as e:  # unpickling, an unknown architecture, missing keys, mismatched shapes
        raise CheckpointError(f"{path} is not a classifier written by `metrics.py train-classifier` "
                              f"({type(e).__name__}); train it again") from None
    if dataset is not None and ckpt.get("dataset", dataset) != dataset:
        raise CheckpointError(f"{path} is a classifier of {ckpt['dataset']}, not {dataset}: pass --classifier "
                              f"with one of {dataset}, or train one with {train_hint}")
    return clf.eval()


def load_splits(dataset, data_dir, holdout=None):
    """The real images of one dataset, split for honest metrics.

    Returns dict(train=(images, labels), held=(images, labels), held_name=str). `held` is what neither
    the diffusion model nor the metrics classifier trains on: the last `holdout` images of each class
    of the training split (data.split_holdout, as train.py --holdout leaves them out) when holdout > 0,
    else the dataset's test split (t10k, CIFAR-10's test images). holdout=None takes the dataset entry's
    per-dataset default.
    """
    holdout = data.get_dataset(dataset).holdout if holdout is None else holdout
    images, labels = data.load_dataset(dataset, data_dir, train=True)
    train_x, train_y, held_x, held_y = data.split_holdout(images, labels, holdout)
    if holdout > 0:
        return dict(train=(train_x, train_y), held=(held_x, held_y),
                    held_name=f"the last {holdout} training images of each class ({len(held_y)}), held out")
    try:
        held_x, held_y = data.load_dataset(dataset, data_dir, train=False)
    except data.DataError as e:
        raise data.DataError(f"no test split to measure against ({e}); or hold out training images "
                             "with --holdout N (images per class)") from None
    return dict(train=(train_x, train_y), held=(held_x, held_y), held_name=f"the {len(held_y)}-image test split")


def reference_and_floor(held_images, held_labels):
    """Split held-out real images in two halves by alternating index (both keep the class balance):
    the FID reference, and a disjoint pool from which the real-data floor is drawn."""
    return (held_images[0::2], held_labels[0::2]), (held_images[1::2], held_labels[1::2])


def real_floor(clf, floor_images, floor_labels, ref_feats, n, seed=0):
    """The metrics of n real held-out images that are not in the reference: what real data scores at
    this sample count (FID's bias grows as n shrinks), the floor to print beside every result."""
    if n > len(floor_labels):
        raise ValueError(f"a floor at n = {n} needs {n} held-out images outside the reference; "
                         f"there are {len(floor_labels)}")
    pick = torch.randperm(len(floor_labels), generator=torch.Generator().manual_seed(seed))[:n]
    return classifier_metrics(clf, floor_images[pick], floor_labels[pick], ref_feats)


def nearest_distances(images, reference, batch_size=1000):
    """For each image, the Euclidean pixel distance (in [−1, 1] units) to its nearest image in `reference`:
    a memorisation check (compare samples' distances to the training set with held-out real images')."""
    a = _as_model_range(torch.as_tensor(images)).flatten(1).double()
    b = _as_model_range(torch.as_tensor(reference)).flatten(1).double()
    out = []
    for start in range(0, len(a), batch_size):
        out.append(torch.cdist(a[start:start + batch_size], b).min(dim=1).values)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# CIFAR-10 with Inception: Inception-v3 FID and IS through torch-fidelity
# --------------------------------------------------------------------------------------------

TORCH_FIDELITY_MISSING = "CIFAR-10 Inception FID/IS needs torch-fidelity: pip install torch-fidelity"


def import_torch_fidelity():
    """torch_fidelity, or ImportError with the one-line install hint."""
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError(TORCH_FIDELITY_MISSING) from None
    return torch_fidelity


class ImageTensorDataset(torch.utils.data.Dataset):
    """In-memory images in the form torch-fidelity reads: item i is a uint8 (3, H, W) tensor."""

    def __init__(self, images_uint8):
        self.images = images_uint8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def cifar10_metrics(images, batch_size=64, device=None, datasets_root=None, verbose=False):
    """Inception FID against the CIFAR-10 training set, and Inception Score (10 splits).

    images: (N, 3, 32, 32) uint8, or floats in [-1, 1] (quantised to uint8 first). The paper uses
    N = 50,000. torch-fidelity downloads CIFAR-10 and the Inception weights on first use (cached).
    Returns dict(fid, is, is_std).
    """
    torch_fidelity = import_torch_fidelity()
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        images = data.to_uint8(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CIFAR-10 metrics need images of shape (N, 3, H, W), got {tuple(images.shape)}")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    result = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(images.cpu()), input2="cifar10-train", isc=True, fid=True,
        cuda=cuda, batch_size=batch_size, datasets_root=datasets_root, verbose=verbose)
    return dict(fid=result["frechet_inception_distance"], **{"is": result["inception_score_mean"]},
                is_std=result["inception_score_std"])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def load_samples_npz(path):
    """(images (N, C, H, W), labels (N,), w (N,)) from a file written by `sample.py --npz`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no samples at {path}: write them with `sample.py ... --npz {path}`")
    with np.load(path) as f:
        missing = {"images", "labels", "w"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: expected the keys that `sample.py --npz` writes")
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2)  # (N, H, W, C) uint8 -> (N, C, H, W)
        return images, torch.from_numpy(f["labels"]).long(), torch.from_numpy(f["w"])


COLUMNS = ("fid", "is", "is_std", "accuracy")


def _row(first, n, m):
    """One table line: `first` (w, or "real"), the image count n, and the COLUMNS of m ("-" where absent)."""
    return f"{first:>6} {n:7d} " + " ".join(f"{m[k]:9.4f}" if k in m else f"{'-':>9}" for k in COLUMNS)


def _per_w(images, labels, ws, compute):
    """Print one table row of `compute(images, labels)` per distinct guidance strength w."""
    print(f"{'w':>6} {'n':>7} " + " ".join(f"{k:>9}" for k in COLUMNS))
    for w in torch.unique(ws).tolist():
        pick = ws == w
        print(_row(f"{w:.2f}", int(pick.sum()), compute(images[pick], labels[pick])))


def classifier_report(clf, splits, images, labels, ws, what):
    """Print `what` and the table of `classifier_metrics` per w, FID against one half of the held-out real
    images (`reference_and_floor`), then the real-data floor: other held-out images at the smallest count of
    one w, scored the same way."""
    (ref_x, _), (floor_x, floor_y) = reference_and_floor(*splits["held"])
    if images.shape[1:] != ref_x.shape[1:]:
        raise ValueError(f"the samples are {'×'.join(map(str, images.shape[1:]))} (C×H×W) images but the real "
                         f"ones are {'×'.join(map(str, ref_x.shape[1:]))}: sample with a model of this dataset")
    ref_feats = classifier_features(clf, ref_x)
    print(f"{what}; FID reference: {len(ref_x)} real images, half of {splits['held_name']}")
    _per_w(images, labels, ws, lambda x, y: classifier_metrics(clf, x, y, ref_feats))
    n = min(min(int((ws == w).sum()) for w in torch.unique(ws)), len(floor_y))
    print(_row("real", n, real_floor(clf, floor_x, floor_y, ref_feats, n))
          + "   <- the floor: other held-out real images, scored the same way")


def _train_command(args):
    """train-classifier: the recipe of args.dataset (train_cifar_classifier or train_classifier, with their
    defaults where a flag is not given), tested on the held-out images, saved with what it was tested on."""
    splits = load_splits(args.dataset, args.data_dir, args.holdout)
    (train_x, train_y), (test_x, test_y), test_name = splits["train"], splits["held"], splits["held_name"]
    print(f"training on {len(train_x)} {args.dataset} images; testing on {test_name}")
    start = time.time()
    train = JUDGE_TRAINING[data.DATASETS[args.dataset].judge]
    given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr") if getattr(args, k) is not None}
    clf = train(train_x, train_y, seed=args.seed, device=args.device, **given)
    test_accuracy = accuracy(clf, test_x, test_y)
    path = args.out or default_classifier_path(args.dataset)
    save_classifier(clf.cpu(), path, dataset=args.dataset, test_accuracy=test_accuracy,
                    test_split=test_name, args=vars(args))
    print(f"test accuracy {test_accuracy:.4f} on {test_name} ({time.time() - start:.0f} s); saved {path}")


def _metrics_command(args):
    """mnist, cifar10: the table of the project classifier's metrics per w, or with --inception torch-fidelity's."""
    if getattr(args, "inception", False):
        import_torch_fidelity()  # fail before loading anything
        images, labels, ws = load_samples_npz(args.npz)
        print("Inception-v3 FID (against the CIFAR-10 training set) and IS, via torch-fidelity: "
              "comparable with published numbers")
        _per_w(images, labels, ws, lambda x, y: cifar10_metrics(x, args.batch_size, args.device))
        return
    dataset = args.dataset if args.command == "mnist" else "cifar10"
    images, labels, ws = load_samples_npz(args.npz)
    clf = load_classifier(args.classifier or default_classifier_path(dataset), dataset=dataset)
    splits = load_splits(dataset, args.data_dir, args.holdout)
    if dataset != "cifar10":
        what = f"{dataset} metrics by the project's classifier, not Inception"
    elif data.dataset_image_folder(data.DATASETS["cifar10"], args.data_dir) is not None:
        what = ("CIFAR-10 metrics by the project's classifier on the image files (JPEG copies differ from the "
                "official pixels), not Inception")
    else:
        what = "CIFAR-10 metrics by the project's classifier on the official files, not Inception"
    classifier_report(clf.to(args.device or "cpu"), splits, images, labels, ws,
                      what + " (compare within this project only, with the same classifier file)")


def main(argv=None):
    mnist, cifar = ({k: v.default for k, v in inspect.signature(f).parameters.items()}  # for the help texts
                    for f in (train_classifier, train_cifar_classifier))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-classifier", help="train the metrics classifier of a dataset")
    p.add_argument("--dataset", default="mnist", choices=list(data.DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--epochs", type=int, help=f"default: {mnist['epochs']}, cifar10 {cifar['epochs']}")
    p.add_argument("--batch-size", type=int, help=f"default: {mnist['batch_size']}, cifar10 {cifar['batch_size']}")
    p.add_argument("--lr", type=float,
                   help=f"default: {mnist['lr']} (Adam), cifar10 {cifar['lr']} (SGD, the one-cycle peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--holdout", type=int, default=None, help="images per class held out (as train.py "
                   "--holdout; default per dataset: " + ", ".join(f"{k} {d.holdout}" for k, d in data.DATASETS.items()) +
                   ", else 0, which uses the test split)")
    for name, what in (("mnist", "MNIST-family"), ("cifar10", "CIFAR-10")):
        p = sub.add_parser(name, help=f"{what} FID / IS / accuracy of sample.py --npz output by the project's "
                           "classifier" + (" (or, with --inception, Inception FID / IS)" if name == "cifar10" else ""))
        p.add_argument("--npz", required=True)
        if name == "mnist":
            p.add_argument("--dataset", default="mnist",
                           choices=[d.name for d in data.DATASETS.values() if d.judge == "Classifier"])
        p.add_argument("--data-dir", default="./data")
        p.add_argument("--classifier", default=None, help="default: out/classifier/<dataset>.pt")
        p.add_argument("--holdout", type=int, default=None, help="as for train-classifier")
        p.add_argument("--device", default=None, help="default: cpu" + (" (with --inception: cuda if there is one)"
                                                                          if name == "cifar10" else ""))
    p.add_argument("--inception", action="store_true", help="Inception-v3 FID (against the training set) and IS "
                   "through torch-fidelity instead, comparable with published numbers; needs torch-fidelity and "
                   "its downloaded weights")
    p.add_argument("--batch-size", type=int, default=64, help="with --inception")
    args = parser.parse_args(argv)
    try:
        (_train_command if args.command == "train-classifier" else _metrics_command)(args)
    except (ImportError, ValueError, FileNotFoundError) as e:  # DataError, CheckpointError are ValueErrors
        print(f"metrics.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

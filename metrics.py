"""Sample-quality metrics: Fréchet distance, Inception Score, an MNIST-family classifier, CIFAR-10 via Inception.

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
- The MNIST-family metrics. There is no standard network for 28×28 digits, so the project
  trains its own small CNN (`Classifier`) and uses its penultimate 128-d features for an
  "MNIST FID", its softmax for an "MNIST IS", and its argmax for the class accuracy of
  conditional samples (did the sampler draw the digit it was asked for?).
  THESE ARE NOT INCEPTION NUMBERS: they depend on this classifier and its training run, and
  are comparable only with each other, within this project (same checkpoint), never with
  published FID/IS values.
- CIFAR-10: the standard Inception-v3 FID and IS against the CIFAR-10 training set, through
  torch-fidelity (the exact port of the original TensorFlow network; `pip install
  torch-fidelity`, it is imported only when used). Comparable with published numbers.

Commands:
    python metrics.py train-classifier --dataset mnist --data-dir ../shared/data/mnist-4k
        trains the classifier (minutes on 2 CPU cores) and saves it to out/classifier/mnist.pt,
        leaving out the held-out images (`load_splits`), on which it reports its accuracy.
    python metrics.py mnist --npz samples.npz --dataset mnist --data-dir ../shared/data/mnist-4k
        MNIST FID / IS / class accuracy of samples written by `sample.py --npz`, per w, against
        half of the held-out real images, and the real-data floor from the other half.

Held-out real images (`load_splits`): FID against the training images could be won by a model
that memorised them, so the reference is real images nothing was trained on: the test split
(t10k) where there is one, else the last --holdout images of each class (mnist: 200 per class,
data.HOLDOUT), which `python train.py --dataset mnist` leaves out of training by the same rule.
    python metrics.py cifar10 --npz samples.npz
        Inception FID / IS of CIFAR-10 samples written by `sample.py --npz`, per w.
"""
import argparse
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
# The MNIST-family classifier (NOT Inception: its numbers compare only within this project)
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


def mnist_metrics(clf, images, labels, ref_feats, splits=10):
    """MNIST FID / IS / class accuracy of generated `images` asked to be of class `labels`.

    ref_feats: `classifier_features` of real images (the reference set for FID).
    Returns dict(fid, is, is_std, accuracy). Not Inception numbers: compare only within this
    project, with the same classifier checkpoint.
    """
    feats, probs = classifier_outputs(clf, images)
    is_mean, is_std = inception_score(probs, splits=splits)
    accuracy = (probs.argmax(dim=1) == torch.as_tensor(labels)).double().mean().item()
    return dict(fid=frechet_distance(feats, ref_feats), **{"is": is_mean}, is_std=is_std, accuracy=accuracy)


def random_shift(x, max_shift, generator=None):
    """Translate each image (B, C, H, W) by up to `max_shift` pixels each way, filling with −1 (black)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2 s, W + 2 s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


def train_classifier(images, labels, epochs=40, batch_size=128, lr=1e-3, max_shift=2, seed=0, device="cpu",
                     log=print):
    """Train a `Classifier` with Adam on uint8 images (N, C, H, W) and int64 labels (N,),
    augmenting with random translations of up to `max_shift` pixels."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(in_channels=images.shape[1], image_size=images.shape[2],
                     num_classes=int(labels.max()) + 1).to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr)
    x_all, y_all = data.to_model_range(images), labels
    for epoch in range(epochs):
        clf.train()
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = random_shift(x_all[idx], max_shift, generator).to(device)
            loss = F.cross_entropy(clf(x), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}  train loss {total / len(order):.4f}")
    return clf.eval()


def accuracy(clf, images, labels):
    """Fraction of images whose argmax class is the label."""
    return (classifier_probs(clf, images).argmax(dim=1) == labels).double().mean().item()


def default_classifier_path(dataset):
    """Where `train-classifier` saves and the notebooks look: <repo>/out/classifier/<dataset>.pt."""
    return os.path.join(REPO, "out", "classifier", f"{dataset}.pt")


def save_classifier(clf, path, **info):
    """Write the classifier's weights, config and `info` (plain values) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(dict(model=clf.state_dict(), config=dict(clf.config), **info), path)


def load_classifier(path, map_location="cpu"):
    """The Classifier stored at `path` (read with weights_only=True), in eval mode.

    Raises CheckpointError with a one-line message when the file is missing or unusable.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no classifier at {path}: train one with "
                              "`python metrics.py train-classifier --dataset mnist --data-dir DIR`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        clf = Classifier(**ckpt["config"])
        clf.load_state_dict(ckpt["model"])
    except Exception as e:  # unpickling, missing keys, mismatched shapes
        raise CheckpointError(f"{path} is not a classifier written by `metrics.py train-classifier` "
                              f"({type(e).__name__}); train it again") from None
    return clf.eval()


def load_splits(dataset, data_dir, holdout=None):
    """The real images of one MNIST-family dataset, split for honest metrics.

    Returns dict(train=(images, labels), held=(images, labels), held_name=str). `held` is what neither
    the diffusion model nor the metrics classifier trains on: the last `holdout` images of each class
    of the training split (data.split_holdout, as train.py --holdout leaves them out) when holdout > 0,
    else the dataset's test split (t10k). holdout=None takes data.HOLDOUT's per-dataset default.
    """
    holdout = data.HOLDOUT.get(dataset, 0) if holdout is None else holdout
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
    return mnist_metrics(clf, floor_images[pick], floor_labels[pick], ref_feats)


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
# CIFAR-10: Inception-v3 FID and IS through torch-fidelity
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


def _per_w(images, labels, ws, compute):
    """Print one table row of `compute(images, labels)` per distinct guidance strength w."""
    print(f"{'w':>6} {'n':>7} " + " ".join(f"{k:>9}" for k in ("fid", "is", "is_std", "accuracy")))
    for w in torch.unique(ws).tolist():
        pick = ws == w
        m = compute(images[pick], labels[pick])
        print(f"{w:6.2f} {int(pick.sum()):7d} " + " ".join(
            f"{m[k]:9.4f}" if k in m else f"{'-':>9}" for k in ("fid", "is", "is_std", "accuracy")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-classifier", help="train the MNIST-family metrics classifier")
    p.add_argument("--dataset", default="mnist", choices=[d for d in data.DATASETS if d != "cifar10"])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--holdout", type=int, default=None, help="images per class held out (as train.py "
                   "--holdout; default per dataset: " + ", ".join(f"{k} {v}" for k, v in data.HOLDOUT.items()) +
                   ", else 0, which uses the test split)")
    p = sub.add_parser("mnist", help="MNIST-family FID / IS / accuracy of sample.py --npz output")
    p.add_argument("--npz", required=True)
    p.add_argument("--dataset", default="mnist", choices=[d for d in data.DATASETS if d != "cifar10"])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--classifier", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--holdout", type=int, default=None, help="as for train-classifier")
    p = sub.add_parser("cifar10", help="Inception FID / IS (torch-fidelity) of sample.py --npz output")
    p.add_argument("--npz", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    try:
        if args.command == "train-classifier":
            splits = load_splits(args.dataset, args.data_dir, args.holdout)
            (train_x, train_y), (test_x, test_y), test_name = splits["train"], splits["held"], splits["held_name"]
            print(f"training on {len(train_x)} {args.dataset} images; testing on {test_name}")
            start = time.time()
            clf = train_classifier(train_x, train_y, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, device=args.device)
            test_accuracy = accuracy(clf, test_x, test_y)
            path = args.out or default_classifier_path(args.dataset)
            save_classifier(clf.cpu(), path, dataset=args.dataset, test_accuracy=test_accuracy,
                            test_split=test_name, args=vars(args))
            print(f"test accuracy {test_accuracy:.4f} on {test_name} "
                  f"({time.time() - start:.0f} s); saved {path}")
        elif args.command == "mnist":
            clf = load_classifier(args.classifier or default_classifier_path(args.dataset))
            splits = load_splits(args.dataset, args.data_dir, args.holdout)
            (ref_x, _), (floor_x, floor_y) = reference_and_floor(*splits["held"])
            ref_feats = classifier_features(clf, ref_x)
            images, labels, ws = load_samples_npz(args.npz)
            print(f"MNIST-classifier metrics (not Inception; compare within this project only); FID reference: "
                  f"{len(ref_x)} real images, half of {splits['held_name']}")
            _per_w(images, labels, ws, lambda x, y: mnist_metrics(clf, x, y, ref_feats))
            n = min(int((ws == w).sum()) for w in torch.unique(ws))
            floor = real_floor(clf, floor_x, floor_y, ref_feats, min(n, len(floor_y)))
            print(f"{'real':>6} {min(n, len(floor_y)):7d} " + " ".join(f"{floor[k]:9.4f}" for k in ("fid", "is", "is_std", "accuracy"))
                  + "   <- the floor: other held-out real images, scored the same way")
        else:
            import_torch_fidelity()  # fail before loading anything
            images, labels, ws = load_samples_npz(args.npz)
            print("Inception FID (vs the CIFAR-10 training set) and IS, via torch-fidelity")
            _per_w(images, labels, ws, lambda x, y: cifar10_metrics(x, args.batch_size, args.device))
    except (ImportError, ValueError, FileNotFoundError) as e:  # DataError, CheckpointError are ValueErrors
        print(f"metrics.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

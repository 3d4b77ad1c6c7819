"""Sample-quality measures: Fréchet distance, Inception Score, and the commands that score samples.

The paper (Ho & Salimans, arXiv 2207.12598, section 4) measures the trade-off that guidance
strength w controls with two numbers on 50k samples (FID falls for small w and then rises; IS
rises with w: Tables 1 and 2):
    FID = ‖μ_a − μ_b‖² + tr C_a + tr C_b − 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2}   (Gaussian fits of
          the features of generated and real images: lower = closer to the data)
    IS  = exp E_x[ KL(p(y|x) ‖ p(y)) ],   p(y) = E_x p(y|x)   (confident and balanced classes)
Both are pure float64 functions here. The features and p(y|x) come from the project's classifiers
(metric_nets.py: NOT Inception, so the numbers compare only within this project, with the same
classifier file), or with --inception from Inception-v3 through torch-fidelity (comparable with
published numbers). FID is against real images nothing trained on (`load_splits`): half are the
reference, the other half give the real-data floor printed beside every result.

    python metrics.py train-classifier --dataset mnist --data-dir DIR      # metric_nets.py
    python metrics.py mnist --npz samples.npz --dataset mnist --data-dir DIR [--json out.json]
    python metrics.py cifar10 --npz samples.npz --data-dir DIR [--inception]
"""
import functools
import inspect
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import cli
import data
from metric_nets import (
    TRAINING,
    classifier_path,
    default_classifier_path,
    load_classifier,
    save_classifier,
)

fail = functools.partial(cli.fail, prog="metrics.py")


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
    d = feats.shape[1]
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(d, d)


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b):
    """‖μ_a − μ_b‖² + tr C_a + tr C_b − 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2}, in float64.

    C_a^{1/2} C_b C_a^{1/2} = (C_a^{1/2} C_b^{1/2})(C_a^{1/2} C_b^{1/2})ᵀ, so the trace of its
    square root is the sum of the singular values of C_a^{1/2} C_b^{1/2}. Taking singular values
    (rather than square roots of eigenvalues) keeps the error at round-off level when the
    covariances are singular: the square root of a round-off eigenvalue of 1e-16 would add 1e-8
    per dimension.
    """
    mu_a, cov_a, mu_b, cov_b = (_float64(t) for t in (mu_a, cov_a, mu_b, cov_b))
    tr_covmean = np.linalg.svd(_sqrt_psd(cov_a) @ _sqrt_psd(cov_b), compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def frechet_distance(feats_a, feats_b):
    """FID between feature sets (N_a, D) and (N_b, D): the Fréchet distance of Gaussian fits."""
    return frechet_distance_from_moments(*feature_statistics(feats_a),
                                         *feature_statistics(feats_b))


def frechet_terms(feats_a, feats_b):
    """FID in its two parts, (mean term, covariance term), which sum to frechet_distance:
    ‖μ_a − μ_b‖², how far apart the two sets' average features lie, and
    tr C_a + tr C_b − 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2}, how differently they spread. For
    diagonal covariances the second is Σ_i (√a_i − √b_i)²: a set of clean, typical images whose
    features spread more or less than the data's pays for it there even with the data's mean."""
    (mu_a, cov_a), (mu_b, cov_b) = feature_statistics(feats_a), feature_statistics(feats_b)
    mean = float((mu_a - mu_b) @ (mu_a - mu_b))
    return mean, frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) - mean


def kernel_distance(feats_a, feats_b):
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared
    maximum mean discrepancy of feature sets (N_a, D) and (N_b, D), with the cubic kernel
    k(x, y) = (xᵀy / D + 1)³, in float64:

        KID = Σ_{i≠j} k(a_i, a_j) / N_a(N_a − 1) + Σ_{i≠j} k(b_i, b_j) / N_b(N_b − 1)
              − 2 Σ_{i,j} k(a_i, b_j) / N_a N_b

    Unbiased, so two sets of real images score 0 on average at any N; FID's bias grows as N
    shrinks, which makes KID the distance to read at a few hundred samples."""
    a, b = _float64(feats_a), _float64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"KID needs two (N, D) feature sets with N >= 2 and one D, got "
                         f"{a.shape} and {b.shape}")
    d = a.shape[1]

    def within(x):  # Σ_{i≠j} k(x_i, x_j) / N(N − 1)
        k = (x @ x.T / d + 1) ** 3
        return (k.sum() - np.trace(k)) / (len(x) * (len(x) - 1))

    return float(within(a) + within(b) - 2 * ((a @ b.T / d + 1) ** 3).mean())


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
        raise ValueError(f"probs must be (N, K) with N >= splits = {splits}, "
                         f"got shape {tuple(probs.shape)}")
    if shuffle_seed is not None:
        order = torch.randperm(len(probs), generator=torch.Generator().manual_seed(shuffle_seed))
        probs = probs[order]
    scores = []
    n = probs.shape[0]
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]  # (n / splits, K)
        p_y = part.mean(dim=0, keepdim=True)  # (1, K)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, p_y)).sum(dim=1)  # 0 log 0 = 0
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# The project's classifiers as measures (NOT Inception: their numbers compare only within it)
# --------------------------------------------------------------------------------------------

def _as_model_range(images):
    """uint8 images, or floats in model range [-1, 1] (as the sampler returns them), -> [-1, 1].

    Floats are first quantised to uint8 exactly as a saved image would be, so generated and real
    images reach the classifier through the same pipeline.
    """
    if images.dtype != torch.uint8:
        images = data.to_uint8(images)
    return data.to_model_range(images)


@torch.no_grad()
def classifier_outputs(clf, images, batch_size=500):
    """(penultimate features (N, D), softmax probabilities (N, K)) of uint8 or [-1, 1] images
    (N, C, H, W), by a metric_nets classifier."""
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
    """The classifier's FID / IS / class accuracy of generated `images` asked to be of `labels`.

    ref_feats: `classifier_features` of real images (the reference set for FID).
    Returns dict(fid, is, is_std, accuracy). Not Inception numbers: compare only within this
    project, with the same classifier file.
    """
    feats, probs = classifier_outputs(clf, images)
    is_mean, is_std = inception_score(probs, splits=splits)
    accuracy = (probs.argmax(dim=1) == torch.as_tensor(labels)).double().mean().item()
    return dict(fid=frechet_distance(feats, ref_feats), **{"is": is_mean}, is_std=is_std,
                accuracy=accuracy)


def accuracy(clf, images, labels):
    """Fraction of images whose argmax class is the label."""
    return (classifier_probs(clf, images).argmax(dim=1) == labels).double().mean().item()


# --------------------------------------------------------------------------------------------
# Held-out real images: the reference, the floor, the memorisation check
# --------------------------------------------------------------------------------------------

def load_splits(dataset, data_dir, holdout=None):
    """The real images of one dataset, split for honest metrics.

    Returns dict(train=(images, labels), held=(images, labels), held_name=str). `held` is what
    neither the diffusion model nor the metrics classifier trains on (FID against training images
    could be won by memorising them): the last `holdout` images of each class of the training
    split (data.split_holdout, as train.py --holdout leaves them out) when holdout > 0, else the
    dataset's test split (t10k, CIFAR-10's test images). holdout=None takes the dataset entry's
    default (data.DATASETS[name].holdout: mnist 200 per class).
    """
    holdout = data.get_dataset(dataset).holdout if holdout is None else holdout
    images, labels = data.load_dataset(dataset, data_dir, train=True)
    train_x, train_y, held_x, held_y = data.split_holdout(images, labels, holdout)
    if holdout > 0:
        name = f"the last {holdout} training images of each class ({len(held_y)}), held out"
        return dict(train=(train_x, train_y), held=(held_x, held_y), held_name=name)
    held_x, held_y = _test_split(dataset, data_dir)
    return dict(train=(train_x, train_y), held=(held_x, held_y),
                held_name=f"the {len(held_y)}-image test split")


def _test_split(dataset, data_dir):
    try:
        return data.load_dataset(dataset, data_dir, train=False)
    except data.DataError as e:
        raise data.DataError(f"no test split to measure against ({e}); or hold out training "
                             "images with --holdout N (images per class)") from None


def load_held(dataset, data_dir, holdout=None):
    """`load_splits(...)["held"]` alone: where it is the test split, the training images are not
    read (50,000 JPEG files for CIFAR-10)."""
    holdout = data.get_dataset(dataset).holdout if holdout is None else holdout
    if holdout > 0:
        return load_splits(dataset, data_dir, holdout)["held"]
    return _test_split(dataset, data_dir)


def reference_and_floor(held_images, held_labels):
    """Split held-out real images in two halves by alternating index (both keep the class
    balance): the FID reference, and a disjoint pool from which the real-data floor is drawn."""
    return (held_images[0::2], held_labels[0::2]), (held_images[1::2], held_labels[1::2])


def real_floor(clf, floor_images, floor_labels, ref_feats, n, seed=0):
    """The metrics of n real held-out images that are not in the reference: what real data scores
    at this sample count (FID's bias grows as n shrinks), the floor to print beside every result."""
    if n > len(floor_labels):
        raise ValueError(f"a floor at n = {n} needs {n} held-out images outside the reference; "
                         f"there are {len(floor_labels)}")
    pick = torch.randperm(len(floor_labels), generator=torch.Generator().manual_seed(seed))[:n]
    return classifier_metrics(clf, floor_images[pick], floor_labels[pick], ref_feats)


def nearest_distances(images, reference, batch_size=1000):
    """For each image, the Euclidean pixel distance (in [−1, 1] units) to its nearest image in
    `reference`: a memorisation check (compare samples' distances to the training set with
    held-out real images')."""
    a = _as_model_range(torch.as_tensor(images)).flatten(1).double()
    b = _as_model_range(torch.as_tensor(reference)).flatten(1).double()
    out = []
    for start in range(0, len(a), batch_size):
        out.append(torch.cdist(a[start:start + batch_size], b).min(dim=1).values)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# CIFAR-10 with Inception: Inception-v3 FID and IS through torch-fidelity
# --------------------------------------------------------------------------------------------

TORCH_FIDELITY_MISSING = ("CIFAR-10 Inception FID/IS needs torch-fidelity: "
                          "pip install torch-fidelity")


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
        raise ValueError("CIFAR-10 metrics need images of shape (N, 3, H, W), "
                         f"got {tuple(images.shape)}")
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
        raise FileNotFoundError(f"no samples at {path}: "
                                f"write them with `sample.py ... --npz {path}`")
    with np.load(path) as f:
        missing = {"images", "labels", "w"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: "
                             "expected the keys that `sample.py --npz` writes")
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return images, torch.from_numpy(f["labels"]).long(), torch.from_numpy(f["w"])


COLUMNS = ("fid", "is", "is_std", "accuracy")


def _row(first, n, m):
    """One table line: `first` (w, or "real"), the count n, the COLUMNS of m ("-" where absent)."""
    return f"{first:>6} {n:7d} " + " ".join(f"{m[k]:9.4f}" if k in m else f"{'-':>9}"
                                            for k in COLUMNS)


def _per_w(images, labels, ws, compute):
    """Print one table row of `compute(images, labels)` per distinct guidance strength w; return
    the rows as dicts {w, n, *COLUMNS} (None where a column is absent)."""
    print(f"{'w':>6} {'n':>7} " + " ".join(f"{k:>9}" for k in COLUMNS))
    rows = []
    for w in torch.unique(ws).tolist():
        pick = ws == w
        m = compute(images[pick], labels[pick])
        print(_row(f"{w:.2f}", int(pick.sum()), m))
        # the npz holds float32: w = 0.3 is stored as 0.30000001
        rows.append(dict(w=round(w, 6), n=int(pick.sum()), **{k: m.get(k) for k in COLUMNS}))
    return rows


def classifier_report(clf, splits, images, labels, ws, what):
    """Print `what` and the table of `classifier_metrics` per w, FID against one half of the
    held-out real images (`reference_and_floor`), then the real-data floor: other held-out images
    at the smallest count of one w, scored the same way. Returns {what, rows, real}."""
    (ref_x, _), (floor_x, floor_y) = reference_and_floor(*splits["held"])
    if images.shape[1:] != ref_x.shape[1:]:
        shape = "×".join(map(str, images.shape[1:]))
        raise ValueError(f"the samples are {shape} (C×H×W) images but the real ones are "
                         f"{'×'.join(map(str, ref_x.shape[1:]))}: "
                         "sample with a model of this dataset")
    ref_feats = classifier_features(clf, ref_x)
    what = f"{what}; FID reference: {len(ref_x)} real images, half of {splits['held_name']}"
    print(what)
    rows = _per_w(images, labels, ws, lambda x, y: classifier_metrics(clf, x, y, ref_feats))
    n = min(min(int((ws == w).sum()) for w in torch.unique(ws)), len(floor_y))
    floor = real_floor(clf, floor_x, floor_y, ref_feats, n)
    print(_row("real", n, floor)
          + "   <- the floor: other held-out real images, scored the same way")
    return dict(what=what, rows=rows, real=dict(n=n, **floor))


def _train_command(args):
    """train-classifier: the recipe of the dataset's judge (metric_nets.TRAINING, its defaults
    where a flag is not given), tested on the held-out images, saved with what it was tested on."""
    splits = load_splits(args.dataset, args.data_dir, args.holdout)
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["held"]
    test_name = splits["held_name"]
    print(f"training on {len(train_x)} {args.dataset} images; testing on {test_name}")
    start = time.time()
    train = TRAINING[data.DATASETS[args.dataset].judge]
    given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr")
             if getattr(args, k) is not None}
    clf = train(train_x, train_y, seed=args.seed, device=args.device, **given)
    test_accuracy = accuracy(clf, test_x, test_y)
    path = args.out or default_classifier_path(args.dataset)
    save_classifier(clf.cpu(), path, dataset=args.dataset, test_accuracy=test_accuracy,
                    test_split=test_name, args=vars(args))
    seconds = time.time() - start
    print(f"test accuracy {test_accuracy:.4f} on {test_name} ({seconds:.0f} s); saved {path}")
    return dict(test_accuracy=test_accuracy, test_split=test_name, seconds=seconds, path=path,
                dataset=args.dataset)


def _metrics_command(args):
    """mnist, cifar10: the table of the project classifier's metrics per w, or with --inception
    torch-fidelity's. Returns {what, rows, real} (real: None with --inception)."""
    if getattr(args, "inception", False):
        import_torch_fidelity()  # fail before loading anything
        images, labels, ws = load_samples_npz(args.npz)
        what = ("Inception-v3 FID (against the CIFAR-10 training set) and IS, via torch-fidelity: "
                "comparable with published numbers")
        print(what)
        rows = _per_w(images, labels, ws,
                      lambda x, y: cifar10_metrics(x, args.batch_size, args.device))
        return dict(what=what, rows=rows, real=None)
    images, labels, ws = load_samples_npz(args.npz)
    clf = load_classifier(classifier_path(args.dataset, args.classifier),
                          dataset=args.dataset)
    splits = load_splits(args.dataset, args.data_dir, args.holdout)
    entry, source = data.DATASETS[args.dataset], ""
    if entry.image_folder:  # read from its official files or from image files: the pixels differ
        source = (" on the image files (JPEG copies differ from the official pixels)"
                  if data.dataset_image_folder(entry, args.data_dir) else " on the official files")
    title = getattr(args, "title", args.dataset)
    what = (f"{title} metrics by the project's classifier{source}, not Inception "
            "(compare within this project only, with the same classifier file)")
    return classifier_report(clf.to(args.device or "cpu"), splits, images, labels, ws, what)


def _subparser(sub, name, help):
    """A subcommand whose errors are one line, exit code 2, as cli.parser's."""
    p = sub.add_parser(name, help=help)
    p.error = lambda message: fail(f"{message} (see python metrics.py {name} --help)")
    return p


def _writable(path):
    """Fail now, not after the work, where the --json file's folder cannot take a file."""
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as e:
        fail(f"cannot write --json {path}: {e.strerror}")


def main(argv=None):
    mnist, cifar = ({k: v.default for k, v in inspect.signature(TRAINING[judge]).parameters.items()}
                    for judge in ("Classifier", "CifarClassifier"))  # defaults, for the help
    parser = cli.parser("metrics.py", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    positive, count = cli.number(int, 1), cli.number(int, 0)
    p = _subparser(sub, "train-classifier", "train the metrics classifier of a dataset")
    p.add_argument("--dataset", default="mnist", choices=list(data.DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--epochs", type=positive,
                   help=f"default: {mnist['epochs']}, cifar10 {cifar['epochs']}")
    p.add_argument("--batch-size", type=positive,
                   help=f"default: {mnist['batch_size']}, cifar10 {cifar['batch_size']}")
    p.add_argument("--lr", type=cli.number(float, 0, low_inclusive=False), help=f"default: "
                   f"{mnist['lr']} (Adam), cifar10 {cifar['lr']} (SGD, the one-cycle peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default: out/classifier/<dataset>.pt")
    p.add_argument("--holdout", type=count, default=None, help="images per class held out "
                   "(as train.py --holdout; default per dataset: " + ", ".join(
                       f"{k} {d.holdout}" for k, d in data.DATASETS.items() if d.holdout)
                   + ", else 0, which uses the test split)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    for name, title in (("mnist", "MNIST-family"), ("cifar10", "CIFAR-10")):
        p = _subparser(sub, name, f"{title} FID / IS / accuracy of sample.py --npz output by the "
                       "project's classifier" + (" (or, with --inception, Inception FID / IS)"
                                                 if name == "cifar10" else ""))
        p.add_argument("--npz", required=True)
        if name == "mnist":  # the datasets that the MNIST family's network measures
            p.add_argument("--dataset", default="mnist", choices=[
                d.name for d in data.DATASETS.values() if d.judge == "Classifier"])
        else:  # one dataset, named in the output's title
            p.set_defaults(dataset="cifar10", title=title)
        p.add_argument("--data-dir", default="./data")
        p.add_argument("--classifier", default=None, help="a file or a shipped name; default: "
                       "out/classifier/<dataset>.pt, else the shipped metrics-<dataset>")
        p.add_argument("--holdout", type=count, default=None, help="as for train-classifier")
        p.add_argument("--device", default=None, help="default: cpu" + (
            " (with --inception: cuda if there is one)" if name == "cifar10" else ""))
        p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument("--inception", action="store_true", help="Inception-v3 FID (against the "
                   "training set) and IS through torch-fidelity instead, comparable with "
                   "published numbers; needs torch-fidelity and its downloaded weights")
    p.add_argument("--batch-size", type=positive, default=64, help="with --inception")
    args = parser.parse_args(argv)
    if args.device is not None:
        cli.device(args.device, fail)  # a device this machine has, else one line
    if args.json:
        _writable(args.json)
    try:
        result = (_train_command if args.command == "train-classifier" else _metrics_command)(args)
    except (ImportError, ValueError, FileNotFoundError) as e:  # DataError, CheckpointError too
        fail(str(e))
    if args.json:
        cli.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

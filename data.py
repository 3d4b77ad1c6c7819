"""The datasets as uint8 tensors: digits, MNIST, Fashion-MNIST, CIFAR-10, a user's own images.

The paper trains on images x in [−1, 1] (DDPM's convention) with class labels c:

    images, labels = load_dataset("mnist", "./data")  # uint8 (N, C, H, W), int64 (N,)
    x = to_model_range(images)                        # x = u / 127.5 − 1 ∈ [−1, 1]
    DATASETS["mnist"].classes                         # label i is classes[i]

Each named dataset is one `Dataset` entry of DATASETS. Its official files are looked for in
data_dir/<name>/, then in data_dir (so mnist-4k's folder can be passed as it is) and checked by
format; missing ones are downloaded (from $CFG_DATA_MIRROR/<name>/ if set) and checked by MD5.
CIFAR-10 may also be PNG or JPEG files in class folders. `imagefolder` is a user's labelled
images, data_dir/train/<class>/*.png|jpg (and test/<class>/), decoded once and cached
(image_folders.py).
Every failure is a one-line DataError that says what to do.

    python data.py mnist --data-dir ./data    # load a dataset, print its shape and classes
"""
import gzip
import hashlib
import http.client
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

import cli
from image_folders import CACHE_ENV, DataError, folder_classes, load_image_folder  # noqa: F401


@dataclass(frozen=True)
class Dataset:
    """One dataset's facts; the scripts read these fields and never branch on a name."""
    name: str
    classes: tuple  # label i is classes[i]
    shape: tuple  # (C, H, W) of its images
    preset: str  # the network and recipe it trains with by default (presets.py)
    reader: str  # how its files are read: a key of READERS
    url: str = ""  # where its official files are published
    files: dict = field(default_factory=dict)  # {train (bool): ((file, published MD5), ...)}
    test_split: bool = True  # whether it has one
    holdout: int = 0  # images per class held out of training for the metrics (split_holdout)
    flips: bool = False  # random horizontal flips in training (natural images, not digits)
    image_folder: bool = False  # also readable as train/<class>/*.jpg folders of its classes
    judge: str = "Classifier"  # the network metrics.py measures its samples with


TEN_DIGITS = tuple("0123456789")
IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_files(md5s):
    """{train: ((file, MD5), (file, MD5)), test: ...}: the four IDX files of the MNIST format."""
    return {True: tuple(zip(IDX[:2], md5s[:2])), False: tuple(zip(IDX[2:], md5s[2:]))}


_DATASETS = [
    # scikit-learn's bundled 8×8 digits: offline, no test split.
    Dataset("digits", TEN_DIGITS, (1, 8, 8), "digits", "sklearn-digits", test_split=False),
    # PyTorch's mirror of yann.lecun.com/exdb/mnist (often unreachable). The last 200 per class
    # are held out, so mnist-4k (scripts/make_mnist_subset.py) has a reference nothing trained on.
    Dataset("mnist", TEN_DIGITS, (1, 28, 28), "mnist", "idx",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            _idx_files(("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
            holdout=200),
    # github.com/zalandoresearch/fashion-mnist's names and MD5s (Debian's package re-gzips the
    # same files: found files are checked by format, not checksum).
    Dataset("fashion-mnist", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                              "Shirt", "Sneaker", "Bag", "Ankle boot"), (1, 28, 28), "mnist", "idx",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            _idx_files(("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    # One archive holds both splits; or the same images as PNG or JPEG files in class folders.
    Dataset("cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                        "ship", "truck"), (3, 32, 32), "cifar10", "cifar10-archive",
            "https://www.cs.toronto.edu/~kriz/",
            dict.fromkeys((True, False),
                          (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),)),
            flips=True, image_folder=True, judge="CifarClassifier"),
]
DATASETS = {d.name: d for d in _DATASETS}  # the named datasets
IMAGE_FOLDER = "imagefolder"  # a user's own images: data_dir/train/<class>/*.png|jpg
MIRROR_ENV = "CFG_DATA_MIRROR"
DOWNLOAD_ATTEMPTS = 3
RETRY_DELAY_S = 1.0  # wait before the 2nd attempt; doubles after each failure


class _BadFile(Exception):
    """A file on disk, or a download, is not what it should be (the message says how)."""


def to_model_range(images):
    """uint8 images u ∈ {0..255} -> float32 x = u / 127.5 − 1 ∈ [−1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x):
    """x ∈ [−1, 1] (clamped) -> uint8 round((x + 1) · 127.5); inverts to_model_range."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------ readers (format checks)

def _read_idx(path, ndim):
    """A gzipped IDX file of unsigned bytes -> numpy array of its header's shape."""
    try:
        with open(path, "rb") as f:
            raw = gzip.decompress(f.read())  # checks the gzip CRC-32 and length trailer
    except (OSError, EOFError, zlib.error) as e:
        raise _BadFile(f"not a complete gzip file: {e}") from None
    header = 4 + 4 * ndim
    # Magic number: two zero bytes, 0x08 (unsigned bytes), then the number of dimensions
    if len(raw) < header or raw[:4] != bytes((0, 0, 8, ndim)):
        raise _BadFile(f"not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise _BadFile(f"header says {shape} but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _check_labels(labels, num_classes=10):
    """Labels must be class indices 0..num_classes − 1."""
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise _BadFile(f"labels outside 0..{num_classes - 1} ({labels.min()}..{labels.max()})")
    return labels


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, bytes and numpy arrays (a CIFAR-10 batch): runs no code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_cifar10(path, train):
    """The archive -> uint8 (N, 3, 32, 32), int64 (N,) of data_batch_1..5 or test_batch."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = {}
    try:  # each batch: a Python 2 pickle of {b"data": uint8 (10000, 3072), b"labels": [int]}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if name in names and member.isfile():  # encoding="bytes": keys stay bytes
                    pickled = tar.extractfile(member)
                    batches[name] = _ArrayUnpickler(pickled, encoding="bytes").load()
        missing = [n for n in names if n not in batches]
        if missing:
            raise _BadFile(f"no {', '.join(missing)} inside")
        data = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
    except (OSError, EOFError, zlib.error, tarfile.TarError, pickle.UnpicklingError,
            KeyError, TypeError, ValueError, OverflowError) as e:
        raise _BadFile(f"not a readable CIFAR-10 archive: {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _BadFile(f"batches hold data {data.shape} and {len(labels)} labels")
    _check_labels(labels)
    # Each row is the red 32×32 plane, then green, then blue, each row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _read_idx_pair(get, train, dataset):
    """The IDX images and labels files of one split -> uint8 (N, 1, H, W), int64 (N,)."""
    (images_file, _), (labels_file, _) = dataset.files[train]
    n = len(dataset.classes)
    images = get(images_file, lambda path: _read_idx(path, 3))  # (N, H, W)
    labels = get(labels_file, lambda path: _check_labels(_read_idx(path, 1), n))  # (N,)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds "
                        f"{len(labels)} labels: they come from different sets; replace one")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_cifar10_archive(get, train, dataset):
    return get(dataset.files[train][0][0], lambda path: _read_cifar10(path, train))


def _load_sklearn_digits(get, train, dataset):
    """scikit-learn's 8×8 digits: pixel values 0..16 become round(v · 255 / 16)."""
    if not train:
        raise DataError("digits has no test split: hold out some of its 1,797 training images")
    from sklearn.datasets import load_digits  # imported here: only digits needs scikit-learn
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))


# How a dataset's files are read: reader(get, train, dataset), get(file, read) -> read(local path)
READERS = {"idx": _read_idx_pair, "cifar10-archive": _read_cifar10_archive,
           "sklearn-digits": _load_sklearn_digits}


# ------------------------------------------------------------------ downloads

def _download(url, path, md5, offline_hint):
    """Fetch url to path; retry a failed, short or wrong-MD5 transfer, not an unreachable server."""
    folder, reason = os.path.dirname(path), None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            print(f"data: download of {url} failed ({reason}); trying again", file=sys.stderr)
            time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as e:  # the server answered with an error status
            reason = f"HTTP {e.code} {e.reason}"
            continue
        except (OSError, ValueError) as e:  # refused, unknown host, timeout, bad URL
            raise DataError(f"cannot reach {url} ({getattr(e, 'reason', e)}). "
                            f"{offline_hint}") from None
        with response:
            print(f"data: downloading {url} -> {path}", file=sys.stderr)
            try:  # the folder is created only once a server answers
                os.makedirs(folder, exist_ok=True)
                return cli.atomic_write(path, lambda f: _stream(response, f, md5))
            except _BadFile as e:  # atomic_write has removed what it wrote
                reason = str(e)
            except OSError as e:
                raise DataError(f"cannot write to {folder} ({e.strerror}): "
                                "pass a writable data_dir") from None
    raise DataError(f"cannot download {url} ({reason}; {DOWNLOAD_ATTEMPTS} attempts). "
                    f"{offline_hint}")


def _stream(response, f, md5):
    """Copy the body into f; _BadFile unless it is all Content-Length bytes with the MD5."""
    expected, n_read, digest = response.length, 0, hashlib.md5()  # length None: not announced
    try:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            n_read += len(chunk)
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, broken chunked encoding
        raise _BadFile(f"{type(e).__name__}: {e}") from None
    # http.client ends the body silently when the server closes early: count the bytes ourselves
    if expected is not None and n_read != expected:
        raise _BadFile(f"connection closed after {n_read} of {expected} bytes")
    if digest.hexdigest() != md5:
        raise _BadFile(f"MD5 {digest.hexdigest()} instead of the published {md5}")


def _files_folder(name, data_dir, files):
    """data_dir/<name>/ if it holds every file, else data_dir if that does, else None."""
    for folder in (os.path.join(data_dir, name), data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            return folder
    return None


def _read_or_fetch(path, url, md5, read, offline_hint):
    """read(path); if the file is missing or fails read's format checks, download it first."""
    if os.path.isfile(path):
        try:
            return read(path)
        except _BadFile as e:
            try:
                os.replace(path, path + ".corrupt")
            except OSError as err:  # a read-only folder
                raise DataError(f"{path} is corrupt ({e}); replace it with {url} "
                                f"(it cannot be moved aside: {err.strerror})") from None
            print(f"data: {path} is corrupt ({e}); moved it to {path}.corrupt", file=sys.stderr)
    _download(url, path, md5, offline_hint)
    try:
        return read(path)
    except _BadFile as e:
        raise DataError(f"{path} ({url}) has the published MD5 but is unreadable ({e})") from None


def _load_files(dataset, data_dir, train):
    """The official files of one split: found in data_dir or downloaded, then read and checked."""
    mirror = os.environ.get(MIRROR_ENV)
    base = f"{mirror.rstrip('/')}/{dataset.name}/" if mirror else dataset.url
    split = dataset.files.get(train, ())
    md5s = dict(split)  # file -> MD5
    folder = _files_folder(dataset.name, data_dir, md5s) or os.path.join(data_dir, dataset.name)
    hint = f"With no network, place {' and '.join(md5s)} (from {dataset.url}) in {folder}"

    def get(file, read):
        return _read_or_fetch(os.path.join(folder, file), base + file, md5s[file], read, hint)

    return READERS[dataset.reader](get, train, dataset)


def _check_classes(split_dir, found, expected, how, fix):
    """DataError naming the extra and missing class folders if found != expected."""
    if tuple(found) != tuple(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        diff = "; ".join(f"{what}: {', '.join(names)}"
                         for what, names in (("extra", extra), ("missing", missing)) if names)
        raise DataError(f"the class folders of {split_dir} {how} ({diff}): {fix}")


def dataset_image_folder(dataset, data_dir):
    """data_dir/<name>/ or else data_dir, where it holds a named dataset as train/ and test/
    image folders (Dataset.image_folder) and its official files (which win) are absent; or None."""
    official = [f for f, _ in dataset.files.get(True, ())]
    if not dataset.image_folder or _files_folder(dataset.name, data_dir, official):
        return None
    return next((folder for folder in (os.path.join(data_dir, dataset.name), data_dir)
                 if any(os.path.isdir(os.path.join(folder, s)) for s in ("train", "test"))), None)


# ------------------------------------------------------------------ public entry points

def split_holdout(images, labels, per_class):
    """(train images, train labels, held images, held labels): the last `per_class` images of
    each class (file order) held out. train.py (--holdout) and the metrics classifier never see
    them, so FID against them cannot be won by memorising the training images."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    if per_class > 0:
        for c in labels.unique():
            index = torch.nonzero(labels == c).flatten()
            if len(index) <= per_class:
                raise DataError(f"class {int(c)} has only {len(index)} images: cannot hold out "
                                f"{per_class} of them")
            held[index[-per_class:]] = True
    return images[~held], labels[~held], images[held], labels[held]


def names():
    """What --dataset takes: the named datasets, then imagefolder."""
    return (*DATASETS, IMAGE_FOLDER)


def get_dataset(name):
    """The entry of a named dataset; DataError (one line) for an unknown name."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(names())}")
    return DATASETS[name]


def class_names(name, data_dir="./data"):
    """The class names of `name` (label i is names[i]): its entry's, or an image folder's."""
    if name == IMAGE_FOLDER:
        return tuple(folder_classes(os.path.join(data_dir, "train")))
    return get_dataset(name).classes


def load_dataset(name, data_dir="./data", train=True, image_size=32, channels=None):
    """uint8 images (N, C, H, W), int64 labels (N,) of the training (or test) split of `name`.
    image_size (H = W) and channels (None: 1 if all images are grayscale, else 3) apply to
    imagefolder; a named dataset's image folders get its shape, its official files keep theirs."""
    split = "train" if train else "test"
    if name == IMAGE_FOLDER:
        split_dir, train_dir = os.path.join(data_dir, split), os.path.join(data_dir, "train")
        classes = folder_classes(split_dir)
        if not train:  # labels come from train/'s class folders: test/ must have the same
            _check_classes(split_dir, classes, folder_classes(train_dir),
                           f"differ from those of {train_dir}", "both splits need the same classes")
        return load_image_folder(split_dir, classes, image_size, channels)
    dataset = get_dataset(name)
    if (root := dataset_image_folder(dataset, data_dir)) is None:
        return _load_files(dataset, data_dir, train)
    split_dir = os.path.join(root, split)
    classes = folder_classes(split_dir)
    _check_classes(split_dir, classes, dataset.classes, f"are not {name}'s",
                   f"name them {', '.join(dataset.classes)}, or use imagefolder for other classes")
    channels, size, _ = dataset.shape
    return load_image_folder(split_dir, classes, size, channels)


if __name__ == "__main__":
    p = cli.parser("data.py", __doc__)
    p.add_argument("dataset", choices=names())
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--test", action="store_true", help="load the test split, not the training one")
    p.add_argument("--image-size", type=int, default=32, help="H = W of image-folder images")
    args = p.parse_args()
    try:
        images, labels = load_dataset(args.dataset, args.data_dir, not args.test, args.image_size)
        classes = class_names(args.dataset, args.data_dir)
    except DataError as e:
        cli.fail(str(e), "data.py")
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    print(f"{args.dataset}: images {tuple(images.shape)} {images.dtype}, values "
          f"{images.min()}..{images.max()}, images per class {dict(zip(classes, counts))}")

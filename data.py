"""The datasets, as uint8 tensors: digits, MNIST, Fashion-MNIST, CIFAR-10 and a user's own images.

The paper trains on images x in [−1, 1] (DDPM's convention) with class labels c:

    images, labels = load_dataset("mnist", "./data")   # uint8 (N, C, H, W), int64 (N,)
    x = to_model_range(images)                         # x = u / 127.5 − 1 ∈ [−1, 1]
    DATASETS["mnist"].classes                          # label i is classes[i]

Each named dataset is one `Dataset` entry of DATASETS: classes, shape, files and checksums, its
held-out split, its default preset. Official files are looked for in data_dir/<name>/, then in
data_dir itself (so a folder of one dataset's files, like mnist-4k, can be passed directly), used
as they are and checked by format; missing ones are downloaded (from $CFG_DATA_MIRROR/<name>/ when
set) with their published MD5. CIFAR-10 may also be JPEG or PNG files in class folders.
`imagefolder` is a user's labelled images: data_dir/train/<class>/*.png|jpg (and test/<class>/),
decoded once and cached (see `read_image_folder` and `cache_folder`). Every failure is a one-line
DataError that says what to do.

    python data.py mnist --data-dir ./data    # load a dataset, print its shape and classes
"""
import gzip
import hashlib
import http.client
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

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
    image_folder: bool = False  # also readable as train/<class>/*.jpg folders of its class names
    judge: str = "Classifier"  # the network metrics.py measures its samples with


TEN_DIGITS = tuple("0123456789")
IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_files(md5s):
    """{train: ((file, MD5), (file, MD5)), test: ...} of the four IDX files of the MNIST format."""
    pairs = tuple(zip(IDX, md5s))
    return {True: pairs[:2], False: pairs[2:]}


_DATASETS = [
    # scikit-learn's bundled 8×8 digits: offline, no test split.
    Dataset("digits", TEN_DIGITS, (1, 8, 8), "digits", "sklearn-digits", test_split=False),
    # PyTorch's mirror of yann.lecun.com/exdb/mnist (often unreachable); the same files. The last
    # 200 per class are held out, so a 4,000-digit mnist-4k (scripts/make_mnist_subset.py) has a
    # reference that nothing trained on.
    Dataset("mnist", TEN_DIGITS, (1, 28, 28), "mnist", "idx",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            _idx_files(("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
            holdout=200),
    # Names and MD5s of github.com/zalandoresearch/fashion-mnist (Debian's package re-gzips the
    # same files: found files are checked by format, not checksum).
    Dataset("fashion-mnist", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                              "Shirt", "Sneaker", "Bag", "Ankle boot"), (1, 28, 28), "mnist", "idx",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            _idx_files(("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    # One archive holds both splits (data_batch_1..5 and test_batch); or the same images as JPEG
    # or PNG files in class folders.
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # the files of an image folder (compared in lower case)
GRAY_MODES = ("1", "L", "LA")  # Pillow modes of grayscale images
CACHE_ENV = "CFG_CACHE_DIR"  # where decoded image folders are cached (default: see cache_folder)
CACHE_FORMAT = 1  # part of every cache key: a change to the decoding must change it


class DataError(ValueError):
    """Unknown dataset, data missing with no network, or a file that cannot be read; one-line message."""


class _CorruptFile(Exception):
    """A file exists but is not in the expected format (the message says how)."""


class _DownloadFailed(Exception):
    """Every download attempt failed (the message says why the last one did)."""


def to_model_range(images):
    """uint8 images u ∈ {0..255} -> float32 x = u / 127.5 − 1 ∈ [−1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x):
    """x ∈ [−1, 1] (values outside are clamped) -> uint8 round((x + 1) · 127.5); inverts to_model_range."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------ readers (format checks)

def _read_idx(path, ndim):
    """An IDX file of unsigned bytes (gzipped) -> numpy array of its header's shape."""
    try:
        with open(path, "rb") as f:
            raw = gzip.decompress(f.read())  # checks the gzip CRC-32 and length trailer
    except (OSError, EOFError, zlib.error) as e:
        raise _CorruptFile(f"not a complete gzip file: {e}") from None
    header = 4 + 4 * ndim
    # Magic number: two zero bytes, 0x08 (unsigned byte data), then the number of dimensions
    if len(raw) < header or raw[:4] != bytes((0, 0, 8, ndim)):
        raise _CorruptFile(f"not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise _CorruptFile(f"header says {shape} but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, bytes and numpy arrays (all a CIFAR-10 batch holds): no code runs."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_cifar10(path, train):
    """cifar-10-python.tar.gz -> uint8 (N, 3, 32, 32), int64 (N,) of data_batch_1..5 or test_batch."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if name in names and member.isfile():
                    # The official format is a Python 2 pickle of a dict {b"data": uint8 (10000, 3072),
                    # b"labels": [int], ...}; encoding="bytes" keeps its str keys as bytes.
                    batches[name] = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
        missing = [n for n in names if n not in batches]
        if missing:
            raise _CorruptFile(f"no {', '.join(missing)} inside")
        data = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
    except (OSError, EOFError, zlib.error, tarfile.TarError, pickle.UnpicklingError,
            KeyError, TypeError, ValueError, OverflowError) as e:
        raise _CorruptFile(f"not a readable CIFAR-10 archive: {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _CorruptFile(f"batches hold data {data.shape} and {len(labels)} labels")
    _check_labels(labels)
    # Each row is the red 32×32 plane, then green, then blue, each row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _check_labels(labels):
    """Labels must be class indices 0..9."""
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise _CorruptFile(f"labels outside 0..9 ({labels.min()}..{labels.max()})")
    return labels


# ------------------------------------------------------------------ downloads

def _download(url, path, md5):
    """Fetch url to path via a temporary file, retrying a transfer that fails, is cut short or has the wrong MD5.

    A server that cannot be reached at all (no network) is reported at once, without retries.
    """
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
            raise _DownloadFailed(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None
        with response:
            try:  # the folder is created only once a server answers
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".part", dir=folder)
            except OSError as e:
                raise DataError(f"cannot write to {folder} ({e.strerror}): pass a writable data_dir") from None
            print(f"data: downloading {url} -> {path}", file=sys.stderr)
            try:
                reason = _stream(response, fd, md5)
                if reason is None:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        if reason is None:
            return
    raise _DownloadFailed(f"cannot download {url} ({reason}; {DOWNLOAD_ATTEMPTS} attempts)")


def _stream(response, fd, md5):
    """Copy the body into fd: None if it is exactly Content-Length bytes with the MD5, else what went wrong."""
    expected, n_read, digest = response.length, 0, hashlib.md5()  # length: Content-Length, or None
    try:
        with os.fdopen(fd, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                n_read += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, broken chunked encoding
        return f"{type(e).__name__}: {e}"
    # http.client ends the body silently when the server closes early: count the bytes ourselves
    if expected is not None and n_read != expected:
        return f"connection closed after {n_read} of {expected} bytes"
    if digest.hexdigest() != md5:
        return f"MD5 {digest.hexdigest()} instead of the published {md5}"
    return None


def _files_folder(name, data_dir, files):
    """data_dir/<name>/ if it holds every file, else data_dir if that does, else data_dir/<name>/."""
    for folder in (os.path.join(data_dir, name), data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            return folder
    return os.path.join(data_dir, name)


def _read_or_fetch(path, url, md5, read, offline_hint):
    """read(path) of the file on disk; if it is missing or fails read's format checks, download it first."""
    if os.path.isfile(path):
        try:
            return read(path)
        except _CorruptFile as e:
            try:
                os.replace(path, path + ".corrupt")
            except OSError as err:  # a read-only folder
                raise DataError(f"{path} is corrupt ({e}); replace it with {url} "
                                f"(it cannot be moved aside: {err.strerror})") from None
            print(f"data: {path} is corrupt ({e}); moved it to {path}.corrupt", file=sys.stderr)
    try:
        _download(url, path, md5)
    except _DownloadFailed as e:
        raise DataError(f"{e}. {offline_hint}") from None
    try:
        return read(path)
    except _CorruptFile as e:
        raise DataError(f"{path} from {url} has the published MD5 but cannot be read ({e})") from None


def _read_idx_pair(get, train, files):
    """The IDX images and labels files of one split -> uint8 (N, 1, H, W), int64 (N,)."""
    (images_file, _), (labels_file, _) = files
    images = get(images_file, lambda path: _read_idx(path, 3))  # (N, H, W)
    labels = get(labels_file, lambda path: _check_labels(_read_idx(path, 1)))  # (N,)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds "
                        f"{len(labels)} labels: they come from different sets; replace one")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_cifar10_archive(get, train, files):
    return get(files[0][0], lambda path: _read_cifar10(path, train))


def _load_files(dataset, data_dir, train):
    """The official files of one split: found in data_dir or downloaded, then read and checked."""
    name = dataset.name
    mirror = os.environ.get(MIRROR_ENV)
    base = f"{mirror.rstrip('/')}/{name}/" if mirror else dataset.url
    files = dict(dataset.files.get(train, ()))  # file -> MD5
    folder = _files_folder(name, data_dir, files)
    hint = f"With no network, place {' and '.join(files)} (from {dataset.url}) in {folder}"

    def get(file, read):
        return _read_or_fetch(os.path.join(folder, file), base + file, files[file], read, hint)

    return READERS[dataset.reader](get, train, dataset.files.get(train, ()))


# ------------------------------------------------------------------ image folders (PNG, JPEG)

def folder_classes(split_dir):
    """The class names of one split of an image folder: its subfolders in sorted order (hidden ones skipped)."""
    try:
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read {split_dir} ({e.strerror}): image folders are laid out as "
                        f"<data_dir>/train/<class>/*.png|jpg (and test/<class>/ for a test split)") from None
    if not classes:
        raise DataError(f"{split_dir} holds no class folders: put each class's images in {split_dir}/<class>/")
    if len(classes) == 1:
        raise DataError(f"{split_dir} holds one class folder ({classes[0]}): a class-conditional model needs "
                        "labelled images of at least two classes, one folder per class")
    return classes


def _image_files(split_dir, classes):
    """(relative paths, labels) of the PNG and JPEG files in split_dir/<class>/, by class, then by file name."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        try:
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        except OSError as e:
            raise DataError(f"cannot read class folder {folder} ({e.strerror}): make it readable or remove it") from None
        if not files:
            raise DataError(f"class folder {folder} holds no .png or .jpg images: add some or remove the folder")
        paths += [os.path.join(name, f) for f in files]
        labels += [label] * len(files)
    return paths, labels


def _decode_image(path, image_size, channels):
    """One image file -> (uint8 (S, S) if grayscale or channels == 1, else (S, S, 3); whether it was not S×S).

    An image that is not S×S has its central square cut out (the shorter side) and resized to S×S with
    Pillow's bicubic filter, which averages over the source pixels when it shrinks."""
    from PIL import Image  # imported here: only image folders need Pillow
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith(("I", "F")):  # 16-bit or 32-bit pixels: converting them would clip
                raise ValueError(f"{image.mode} pixels, more than 8 bits per channel; save it with 8 bits")
            gray = channels == 1 or (channels is None and image.mode in GRAY_MODES)
            image = image.convert("L" if gray else "RGB")  # drops alpha; a palette becomes RGB
            w, h = image.size
            if (w, h) != (image_size, image_size):
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(image), (w, h) != (image_size, image_size)
    # Pillow reports a broken file through several exception types, depending on the format and the damage
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} cannot be read as an image ({reason}): replace or remove it") from None


def read_image_folder(split_dir, classes, image_size, channels=None):
    """Decode split_dir/<class>/*.png|jpg -> uint8 (N, C, S, S), int64 (N,), how many were resized.

    Label = position of the class folder in sorted order; files in sorted order within a class.
    channels None: 1 if every image is grayscale (Pillow modes 1, L, LA), else 3 (grayscale images
    then get three equal channels, alpha is dropped); 1 or 3 converts every image to that. 16-bit
    images are refused; one that is not S×S has its central square cut out and resized (bicubic).
    `_load_image_folder` caches the result, keyed by the files' paths, sizes and times."""
    paths, labels = _image_files(split_dir, classes)
    arrays, resized = [], 0
    for path in paths:
        array, was_resized = _decode_image(os.path.join(split_dir, path), image_size, channels)
        arrays.append(array)
        resized += was_resized
    channels = channels or (1 if all(a.ndim == 2 for a in arrays) else 3)
    images = np.empty((len(arrays), channels, image_size, image_size), dtype=np.uint8)
    for i, array in enumerate(arrays):  # (S, S) broadcasts to every channel; (S, S, 3) -> (3, S, S)
        images[i] = array if array.ndim == 2 else array.transpose(2, 0, 1)
    return images, np.asarray(labels, dtype=np.int64), resized


def cache_folder():
    """Where decoded image folders are cached: $CFG_CACHE_DIR, else $XDG_CACHE_HOME/cfg-diffusion, else
    ~/.cache/cfg-diffusion."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cfg-diffusion")


def _folder_key(split_dir, paths, classes, image_size, channels):
    """A hash of what the decoded array depends on: the files (relative path, size, modification and change
    times), the classes, the size and the channel rule."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{image_size}\0{channels}\0{'/'.join(classes)}\n".encode())
    for path in paths:
        try:
            st = os.stat(os.path.join(split_dir, path))
        except OSError as e:  # e.g. a link to nowhere
            raise DataError(f"{os.path.join(split_dir, path)} cannot be read ({e.strerror}): replace or remove it") from None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def _save_npz(path, **arrays):
    """np.savez to a temporary file beside path, then renamed: path is always whole or absent."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_image_folder(split_dir, classes, image_size, channels):
    """read_image_folder through the cache: decoded once, then read back while the files stay the same."""
    paths, _ = _image_files(split_dir, classes)
    key = _folder_key(split_dir, paths, classes, image_size, channels)
    real = os.path.realpath(split_dir)
    name = (f"{os.path.basename(os.path.dirname(real))}-{os.path.basename(real)}-{image_size}px-"
            f"{f'{channels}ch' if channels else 'auto'}-{hashlib.sha256(real.encode()).hexdigest()[:12]}.npz")
    path = os.path.join(cache_folder(), name)
    cached = None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                cached = stored["images"], stored["labels"], int(stored["resized"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or one that cannot be read: decode
    if cached is not None:
        images, labels, resized = cached
    else:
        images, labels, resized = read_image_folder(split_dir, classes, image_size, channels)
        try:
            os.makedirs(cache_folder(), exist_ok=True)
            _save_npz(path, images=images, labels=labels, resized=resized, key=np.array(key))
            print(f"data: decoded {len(labels)} images of {split_dir}; cached them in {path}", file=sys.stderr)
        except OSError as e:
            print(f"data: decoded {len(labels)} images of {split_dir}; cannot cache them in {cache_folder()} "
                  f"({e.strerror}): set {CACHE_ENV} to a writable folder to skip decoding next time", file=sys.stderr)
    if resized:
        print(f"data: {resized} of {len(labels)} images in {split_dir} are not {image_size}×{image_size}: "
              "centre-cropped to square and resized", file=sys.stderr)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _image_folder_split(root, train):
    """(split_dir, its classes) of the image folder `root`."""
    split_dir = os.path.join(root, "train" if train else "test")
    if not os.path.isdir(split_dir):
        raise DataError(f"no folder {split_dir}: image folders are laid out as {root}/train/<class>/*.png|jpg "
                        "(and test/<class>/ for a test split)")
    return split_dir, folder_classes(split_dir)


def _class_difference(found, expected):
    """'extra: a, b; missing: c': how two lists of class names differ."""
    extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in (("extra", extra), ("missing", missing)) if names)


def dataset_image_folder(dataset, data_dir):
    """The folder holding a named dataset as train/ and test/ image folders (Dataset.image_folder),
    or None where its official files are present (they win) or no such folder is: data_dir/<name>/
    first, then data_dir."""
    if not dataset.image_folder:
        return None
    folders = (os.path.join(data_dir, dataset.name), data_dir)
    official = [f for f, _ in dataset.files.get(True, ())]
    if any(all(os.path.isfile(os.path.join(d, f)) for f in official) for d in folders):
        return None
    return next((folder for folder in folders
                 if any(os.path.isdir(os.path.join(folder, split)) for split in ("train", "test"))), None)


# ------------------------------------------------------------------ public entry points

def split_holdout(images, labels, per_class):
    """Hold out the last `per_class` images of each class (in file order) from a training split.

    Returns (train_images, train_labels, held_images, held_labels). The held-out images are the ones
    that train.py (--holdout) and the metrics classifier never see, so FID against them cannot be won
    by memorising the training images."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    if per_class > 0:
        for c in labels.unique():
            index = torch.nonzero(labels == c).flatten()
            if len(index) <= per_class:
                raise DataError(f"class {int(c)} has only {len(index)} images: cannot hold out {per_class} of them")
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
    """The class names of `name`, label i being names[i]: its entry's, or an image folder's
    train/ folders."""
    if name == IMAGE_FOLDER:
        return tuple(_image_folder_split(data_dir, train=True)[1])
    return get_dataset(name).classes


def _load_sklearn_digits(get, train, files):
    """scikit-learn's 8×8 digits: pixel values 0..16 become round(v · 255 / 16)."""
    if not train:
        raise DataError("scikit-learn's digits has no test split: hold out part of the 1,797 "
                        "training images")
    from sklearn.datasets import load_digits  # imported here: only digits needs scikit-learn
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))


# How a dataset's files are read: reader(get, train, files), get(file, read) -> read(local path)
READERS = {"idx": _read_idx_pair, "cifar10-archive": _read_cifar10_archive,
           "sklearn-digits": _load_sklearn_digits}


def load_dataset(name, data_dir="./data", train=True, image_size=32, channels=None):
    """(images, labels): uint8 (N, C, H, W) and int64 (N,) of the training (or test) split of `name`.

    image_size (H = W) and channels (None: 1 if every image is grayscale, else 3) apply to
    imagefolder; a named dataset read from image folders is brought to its own shape; the official
    files keep their own size."""
    if name == IMAGE_FOLDER:
        split_dir, classes = _image_folder_split(data_dir, train)
        if not train:  # class indices come from train/'s folders: test/ must have the same ones
            train_dir, train_classes = _image_folder_split(data_dir, True)
            if classes != train_classes:
                raise DataError(f"the class folders of {split_dir} differ from those of {train_dir} "
                                f"({_class_difference(classes, train_classes)}): both splits need "
                                "the same classes")
        return _load_image_folder(split_dir, classes, image_size, channels)
    dataset = get_dataset(name)
    if (root := dataset_image_folder(dataset, data_dir)) is not None:
        split_dir, classes = _image_folder_split(root, train)
        if tuple(classes) != dataset.classes:
            raise DataError(f"the class folders of {split_dir} are not {name}'s "
                            f"({_class_difference(classes, dataset.classes)}): name them "
                            f"{', '.join(dataset.classes)}, or use imagefolder for other classes")
        channels, size, _ = dataset.shape
        return _load_image_folder(split_dir, classes, size, channels=channels)
    return _load_files(dataset, data_dir, train)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=names())
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--test", action="store_true", help="load the test split instead of the training split")
    p.add_argument("--image-size", type=int, default=32, help="H = W of image-folder images")
    args = p.parse_args()
    try:
        images, labels = load_dataset(args.dataset, args.data_dir, train=not args.test, image_size=args.image_size)
        names = class_names(args.dataset, args.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{args.dataset}: images {tuple(images.shape)} {images.dtype}, values {images.min()}..{images.max()}, "
          f"images per class {dict(zip(names, torch.bincount(labels, minlength=len(names)).tolist()))}")

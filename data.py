"""The datasets of the paper's kind of experiment, as uint8 tensors: digits, MNIST, Fashion-MNIST, CIFAR-10,
and a user's own labelled images.

Classifier-Free Diffusion Guidance (Ho & Salimans, arXiv 2207.12598) trains on images x scaled
to [−1, 1] (the DDPM convention), with class labels c that Algorithm 1 sometimes replaces by ∅:

    images, labels = load_dataset("mnist", "./data")   # uint8 (N, C, H, W), int64 (N,)
    x = to_model_range(images)                         # x = u / 127.5 − 1 ∈ [−1, 1]
    u = to_uint8(x)                                    # the inverse (clamped, rounded)
    names = class_names("mnist", "./data")             # label i is names[i]

Datasets (`DATASETS`, then `IMAGE_FOLDER`):
- digits: scikit-learn's bundled 8×8 digits (1,797 images, offline); pixel values 0..16 become
  round(v · 255 / 16). scikit-learn ships no test split, so train=False raises DataError.
- mnist, fashion-mnist: the official IDX files (train-images-idx3-ubyte.gz, ...), 1×28×28.
- cifar10: the official cifar-10-python.tar.gz, 3×32×32 (random flips belong to train.py); where
  that file is absent, the image-folder layout below in data_dir/cifar10/ or data_dir, whose class
  folders must be CIFAR-10's ten names (airplane ... truck: sorted, they are its label order).
- imagefolder: a user's own labelled images in the image-folder layout of data_dir, at
  image_size × image_size (load_dataset's argument).

The image-folder layout: data_dir/train/<class>/* and data_dir/test/<class>/*, PNG or JPEG files
(.png, .jpg, .jpeg), RGB or grayscale. Class index = position of the folder name in sorted order;
within a class, files are taken in sorted order. Channels: 1 if every image of the split is
grayscale (Pillow modes 1, L, LA), else 3 (grayscale images then get three equal channels; alpha
is dropped); 16-bit images are refused. An image that is not image_size × image_size has its
central square cut out and resized (Pillow's bicubic filter), and a one-line note says how many.
Errors are one-line DataErrors: an unreadable image (named), a class folder with no images, fewer
than two classes, a test split whose class folders differ from train's. Decoding takes a while
(every file is opened), so the decoded uint8 array is cached outside the data folder (which may be
read-only): in $CFG_CACHE_DIR, else $XDG_CACHE_HOME/cfg-diffusion, else ~/.cache/cfg-diffusion,
one file per folder, split, size and channel rule, written to a temporary name and renamed. It is
used only while its key matches: a hash of the sorted relative paths with their sizes and
modification and change times, the classes, the image size and the channel rule, so a changed,
added or removed file has the folder decoded afresh.

Where the official files are looked for: data_dir/<name>/ first, then data_dir itself (so a folder holding
one dataset's files, like a 4,000-digit mnist-4k made by scripts/make_mnist_subset.py or Debian's /usr/share/datasets/fashion-mnist,
can be passed directly). Files found there are used as they are, never written to, and checked
by format rather than checksum (subsets and repackaged copies are fine): gzip integrity, IDX
header against byte count, labels in 0..9, equal image and label counts. A file that fails is
moved aside to <file>.corrupt and fetched again, or reported if the folder is read-only.

Missing files are downloaded into data_dir/<name>/ from the official locations (`SOURCES`), or
from $CFG_DATA_MIRROR/<name>/<file> when that variable is set (e.g. `python -m http.server`
run in another machine's data folder). Each download streams to a temporary file, must deliver
exactly Content-Length bytes with the published MD5, and is then renamed into place; a failed
attempt is retried, and after the last one DataError says which files to place where.

`split_holdout(images, labels, per_class)` holds out the last images of each class (HOLDOUT: mnist 200),
for data without a test split: train.py (--holdout) and metrics.py leave them out by the same rule.

Run `python data.py mnist --data-dir ./data` to load a dataset and print its shape and classes.
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

import numpy as np
import torch

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")  # the named datasets, each with known classes
IMAGE_FOLDER = "imagefolder"  # a user's own images: data_dir/train/<class>/*.png|jpg (see the docstring)
# Label i of each named dataset is the class CLASS_NAMES[name][i] (for image folders: the sorted folder names)
CLASS_NAMES = {
    "digits": tuple("0123456789"),
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),  # the names of github.com/zalandoresearch/fashion-mnist
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
# Images per class held out of training for the metrics (split_holdout), where the data may have no
# test split: mnist-4k (scripts/make_mnist_subset.py) is 4,000 training digits. train.py (--holdout) and metrics.py
# both default to it, so the diffusion model, the metrics classifier and the FID reference agree.
HOLDOUT = {"mnist": 200}

# name -> (official base URL, {train: ((file, published MD5), ...)})
SOURCES = {
    # PyTorch's S3 mirror of yann.lecun.com/exdb/mnist (that site is often unreachable); same files
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        True: (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
               ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")),
        False: (("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"))}),
    # MD5s from github.com/zalandoresearch/fashion-mnist; Debian's dataset-fashion-mnist package
    # re-gzips the same files, so its copies have other checksums (found files are not checksummed)
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        True: (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
               ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")),
        False: (("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"))}),
    # One archive holds both splits: data_batch_1..5 (train) and test_batch
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", dict.fromkeys(
        (True, False), (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),))),
}
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


def _load_files(name, data_dir, train):
    """The official files of one split: found in data_dir or downloaded, then read and checked."""
    official, splits = SOURCES[name]
    base = f"{os.environ[MIRROR_ENV].rstrip('/')}/{name}/" if os.environ.get(MIRROR_ENV) else official
    files = dict(splits[train])  # file -> MD5
    folder = _files_folder(name, data_dir, files)
    hint = f"With no network, place {' and '.join(files)} (from {official}) in {folder}"

    def get(file, read):
        return _read_or_fetch(os.path.join(folder, file), base + file, files[file], read, hint)

    if name == "cifar10":
        return get("cifar-10-python.tar.gz", lambda path: _read_cifar10(path, train))
    images_file, labels_file = files
    images = get(images_file, lambda path: _read_idx(path, 3))  # (N, H, W)
    labels = get(labels_file, lambda path: _check_labels(_read_idx(path, 1)))  # (N,)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} "
                        f"labels (in {folder}): they come from different sets; replace one")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


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
    """Decode split_dir/<class>/*.png|jpg -> uint8 (N, C, S, S), int64 (N,), the number of images resized.

    channels None: 1 if every image is grayscale, else 3; 1 or 3 converts every image to that."""
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


def cifar10_image_folder(data_dir):
    """The folder holding CIFAR-10 as train/ and test/ image folders, or None where the official archive is
    present (it wins) or no such folder is: data_dir/cifar10/ first, then data_dir."""
    folders = (os.path.join(data_dir, "cifar10"), data_dir)
    archive = SOURCES["cifar10"][1][True][0][0]
    if any(os.path.isfile(os.path.join(folder, archive)) for folder in folders):
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


def class_names(name, data_dir="./data"):
    """The class names of `name`, label i being names[i]: CLASS_NAMES, or an image folder's train/ folders."""
    if name == IMAGE_FOLDER:
        return tuple(_image_folder_split(data_dir, train=True)[1])
    if name not in CLASS_NAMES:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS + (IMAGE_FOLDER,))}")
    return CLASS_NAMES[name]


def load_dataset(name, data_dir="./data", train=True, image_size=32, channels=None):
    """(images, labels): uint8 (N, C, H, W) and int64 (N,) of the training (or test) split of `name`.

    image_size (H = W) and channels (None: 1 if every image is grayscale, else 3) apply to imagefolder;
    CIFAR-10 image folders are brought to 3×image_size×image_size; the official files keep their own size."""
    if name not in DATASETS + (IMAGE_FOLDER,):
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS + (IMAGE_FOLDER,))}")
    if name == IMAGE_FOLDER:
        split_dir, classes = _image_folder_split(data_dir, train)
        if not train:  # class indices come from train/'s folders: test/ must have the same ones
            train_dir, train_classes = _image_folder_split(data_dir, True)
            if classes != train_classes:
                raise DataError(f"the class folders of {split_dir} differ from those of {train_dir} "
                                f"({_class_difference(classes, train_classes)}): both splits need the same classes")
        return _load_image_folder(split_dir, classes, image_size, channels)
    if name == "cifar10" and (root := cifar10_image_folder(data_dir)) is not None:
        split_dir, classes = _image_folder_split(root, train)
        if tuple(classes) != CLASS_NAMES["cifar10"]:
            raise DataError(f"the class folders of {split_dir} are not CIFAR-10's ten "
                            f"({_class_difference(classes, CLASS_NAMES['cifar10'])}): name them "
                            f"{', '.join(CLASS_NAMES['cifar10'])}, or use imagefolder for other classes")
        return _load_image_folder(split_dir, classes, image_size, channels=3)
    if name == "digits":
        if not train:
            raise DataError("scikit-learn's digits has no test split: hold out part of the 1,797 training images")
        from sklearn.datasets import load_digits  # imported here: only digits needs scikit-learn
        digits = load_digits()
        # Pixel values are integers 0..16; scaled to 0..255 as round(v · 255 / 16)
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))
    return _load_files(name, data_dir, train)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=DATASETS + (IMAGE_FOLDER,))
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

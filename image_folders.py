"""A user's labelled images as uint8 tensors: DIR/train/<class>/*.png|jpg (and test/<class>/).

    images, labels = load_image_folder("DIR/train", folder_classes("DIR/train"), image_size=32)

Label i is the i-th class folder in sorted order. PNG or JPEG, RGB or grayscale; an image that is
not square at the size asked for is centre-cropped and resized. Decoding opens every file, so the
result is cached outside the data folder (which may be read-only): in $CFG_CACHE_DIR, else
$XDG_CACHE_HOME/cfg-diffusion, else ~/.cache/cfg-diffusion, keyed by the files' paths, sizes and
times, so a changed, added or removed file is decoded afresh. data.py reads `imagefolder`, and
any dataset entry with `image_folder=True` (CIFAR-10 as JPEG files), through it. Errors are
one-line DataErrors that say what to do.
"""
import hashlib
import os
import sys
import zipfile

import numpy as np
import torch

import cli

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # an image folder's files (in lower case)
GRAY_MODES = ("1", "L", "LA")  # Pillow modes of grayscale images
CACHE_ENV = "CFG_CACHE_DIR"  # where decoded image folders are cached (see cache_folder)
CACHE_FORMAT = 1  # part of every cache key: a change to the decoding must change it


class DataError(ValueError):
    """Unknown dataset, missing data with no network, or an unreadable file; one line."""


def folder_classes(split_dir):
    """One split's class names: its subfolders, sorted, hidden ones skipped."""
    layout = (f"image folders are laid out as {os.path.dirname(split_dir)}/train/<class>/*.png|jpg"
              " (and test/<class>/ for a test split)")
    if not os.path.isdir(split_dir):
        raise DataError(f"no folder {split_dir}: {layout}")
    try:
        classes = sorted(e.name for e in os.scandir(split_dir)
                         if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read {split_dir} ({e.strerror}): {layout}") from None
    if not classes:
        raise DataError(f"{split_dir} holds no class folders: put each class's images in "
                        f"{split_dir}/<class>/")
    if len(classes) == 1:
        raise DataError(f"{split_dir} holds one class folder ({classes[0]}): a class-conditional "
                        "model needs labelled images of at least two classes, one folder each")
    return classes


def _image_files(split_dir, classes):
    """(relative paths, labels) of the images in split_dir/<class>/, by class, then name."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        try:
            files = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        except OSError as e:
            raise DataError(f"cannot read class folder {folder} ({e.strerror}): make it "
                            "readable or remove it") from None
        if not files:
            raise DataError(f"class folder {folder} holds no .png or .jpg images: add some or "
                            "remove the folder")
        paths += [os.path.join(name, f) for f in files]
        labels += [label] * len(files)
    return paths, labels


def _decode_image(path, image_size, channels):
    """One image -> uint8 (S, S) if grayscale or channels == 1, else (S, S, 3); whether it was
    not S×S (then its central square is resized with Pillow's bicubic filter, which averages
    over the source pixels when it shrinks)."""
    from PIL import Image  # imported here: only image folders need Pillow
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith(("I", "F")):  # 16- or 32-bit pixels: converting would clip
                raise ValueError(f"{image.mode} pixels, over 8 bits; save it with 8 bits")
            gray = channels == 1 or (channels is None and image.mode in GRAY_MODES)
            image = image.convert("L" if gray else "RGB")  # drops alpha; a palette becomes RGB
            w, h = image.size
            if (w, h) != (image_size, image_size):
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(image), (w, h) != (image_size, image_size)
    # Pillow reports a broken file through several exception types, by format and damage
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} cannot be read as an image ({reason}): "
                        "replace or remove it") from None


def read_image_folder(split_dir, classes, image_size, channels=None):
    """Decode split_dir/<class>/*.png|jpg -> uint8 (N, C, S, S), int64 (N,), how many resized.

    Label i is classes[i]; files sorted by name. channels None: 1 if every image is grayscale
    (Pillow modes 1, L, LA), else 3 (gray repeated, alpha dropped); 1 or 3 converts each one."""
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
    """$CFG_CACHE_DIR, else $XDG_CACHE_HOME/cfg-diffusion, else ~/.cache/cfg-diffusion."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "cfg-diffusion")


def _folder_key(split_dir, classes, image_size, channels):
    """A hash of what the decoded images depend on: the classes, size and channel rule, and
    each file's relative path, size, modification and change times."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{image_size}\0{channels}\0{'/'.join(classes)}\n"
                            .encode())
    for path in _image_files(split_dir, classes)[0]:
        full = os.path.join(split_dir, path)
        try:
            st = os.stat(full)
        except OSError as e:  # e.g. a link to nowhere
            raise DataError(f"{full} cannot be read ({e.strerror}): replace or remove it") from None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def load_image_folder(split_dir, classes, image_size, channels=None):
    """read_image_folder, cached: decoded once, then read back while the files stay the same."""
    key = _folder_key(split_dir, classes, image_size, channels)
    real = os.path.realpath(split_dir)
    rule = f"{channels}ch" if channels else "auto"
    name = (f"{os.path.basename(os.path.dirname(real))}-{os.path.basename(real)}-{image_size}px-"
            f"{rule}-{hashlib.sha256(real.encode()).hexdigest()[:12]}.npz")
    path, images = os.path.join(cache_folder(), name), None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) == key:
                images, labels, resized = npz["images"], npz["labels"], int(npz["resized"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or one that cannot be read: decode
    if images is None:
        images, labels, resized = read_image_folder(split_dir, classes, image_size, channels)
        note = f"data: decoded {len(labels)} images of {split_dir}"
        try:
            os.makedirs(cache_folder(), exist_ok=True)
            cli.atomic_write(path, lambda f: np.savez(f, images=images, labels=labels,
                                                      resized=resized, key=np.array(key)))
            print(f"{note}; cached them in {path}", file=sys.stderr)
        except OSError as e:
            print(f"{note}; cannot cache them in {cache_folder()} ({e.strerror}): set "
                  f"{CACHE_ENV} to a writable folder to skip decoding next time", file=sys.stderr)
    if resized:
        print(f"data: {resized} of {len(labels)} images in {split_dir} are not "
              f"{image_size}×{image_size}: centre-cropped to square and resized", file=sys.stderr)
    return torch.from_numpy(images), torch.from_numpy(labels)

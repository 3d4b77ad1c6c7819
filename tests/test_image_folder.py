"""Tests for data.py's image folders (imagefolder, CIFAR-10 as train/<class>/*.jpg) on small
folders written here: pixels against the arrays the files came from (PNG is lossless, so exactly;
JPEG within its compression error), crops and resizes against numpy slices and an area average,
every bad input, and the cache (reused, invalidated by a changed file, never half-written).

Run: python -m pytest -q tests/test_image_folder.py
"""
import os

import numpy as np
import pytest
import torch
from conftest import shared_data
from PIL import Image

import data
import image_folders

CIFAR10 = data.DATASETS["cifar10"].classes


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache folder of this test's own (never ~/.cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(folder))
    return folder


def cache_files(folder):
    return sorted(os.listdir(folder)) if folder.exists() else []


def write(path, array, **save_args):
    """array: uint8 (H, W) or (H, W, 3|4), or an Image; saved by Pillow as path's extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    image.save(path, **save_args)


def random_rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_chw(array):
    """(H, W) -> (1, H, W); (H, W, 3) -> (3, H, W): how load_dataset lays images out."""
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def make_folder(root, classes, rng, size=8, per_class=3, split="train", kind="rgb"):
    """root/split/<class>/<i>.png of random pixels; returns {class: [arrays in file order]}."""
    arrays = {}
    for name in classes:
        arrays[name] = []
        for i in range(per_class):
            array = (random_rgb(rng, size, size) if kind == "rgb"
                     else rng.integers(0, 256, (size, size), dtype=np.uint8))
            write(root / split / name / f"{i:02d}.png", array)
            arrays[name].append(array)
    return arrays


def load(root, **kwargs):
    return data.load_dataset(data.IMAGE_FOLDER, str(root), **kwargs)


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------- decoding: pixels, channels, order

def test_png_pixels_come_back_exactly_with_labels_by_sorted_class_name(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["zebra", "Ant", "bee"]  # made out of order; sorted (case-sensitive): Ant, bee, zebra
    arrays = make_folder(tmp_path, classes, rng, size=8, per_class=3)
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")  # other files are ignored
    (tmp_path / "train" / "bee" / ".hidden.png").write_bytes(b"ignored: hidden")
    (tmp_path / "train" / ".thumbnails").mkdir()  # hidden folders are not classes
    images, labels = load(tmp_path, image_size=8)
    order = sorted(classes)
    assert order == ["Ant", "bee", "zebra"]
    assert data.class_names(data.IMAGE_FOLDER, str(tmp_path)) == tuple(order)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (9, 3, 8, 8)
    expected = np.stack([as_chw(a) for name in order for a in arrays[name]])
    np.testing.assert_array_equal(images.numpy(), expected)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_file_order_within_a_class_is_sorted_by_name(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {name: random_rgb(rng, 4, 4) for name in ("b.png", "a.png", "c.jpeg")}
    for name, array in arrays.items():
        quality = {"quality": 100} if name.endswith("jpeg") else {}
        write(tmp_path / "train" / "x" / name, array, **quality)
    write(tmp_path / "train" / "y" / "a.png", random_rgb(rng, 4, 4))
    images, labels = load(tmp_path, image_size=4)
    np.testing.assert_array_equal(images[0].numpy(), as_chw(arrays["a.png"]))
    np.testing.assert_array_equal(images[1].numpy(), as_chw(arrays["b.png"]))
    assert labels.tolist() == [0, 0, 0, 1]


def test_all_grayscale_gives_one_channel_exactly(tmp_path):
    rng = np.random.default_rng(2)
    arrays = make_folder(tmp_path, ["a", "b"], rng, size=6, kind="gray")
    bits = np.kron(np.eye(3, dtype=bool), np.ones((2, 2), dtype=bool))  # mode "1": black and white
    write(tmp_path / "train" / "b" / "03.png", Image.fromarray(bits))
    images, _ = load(tmp_path, image_size=6)
    assert images.shape == (7, 1, 6, 6)
    np.testing.assert_array_equal(images[:3, 0].numpy(), np.stack(arrays["a"]))
    np.testing.assert_array_equal(images[6, 0].numpy(), bits * 255)


def test_mixed_grayscale_and_colour_gives_rgb_with_grayscale_repeated(tmp_path):
    rng = np.random.default_rng(3)
    gray, rgb = rng.integers(0, 256, (5, 5), dtype=np.uint8), random_rgb(rng, 5, 5)
    alpha = rng.integers(0, 256, (5, 5, 1), dtype=np.uint8)
    rgba = np.concatenate([random_rgb(rng, 5, 5), alpha], axis=2)
    write(tmp_path / "train" / "a" / "gray.png", gray)
    write(tmp_path / "train" / "a" / "rgba.png", rgba)
    write(tmp_path / "train" / "b" / "rgb.png", rgb)
    images, labels = load(tmp_path, image_size=5)
    assert images.shape == (3, 3, 5, 5) and labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(images[0].numpy(), np.stack([gray] * 3))
    np.testing.assert_array_equal(images[1].numpy(), as_chw(rgba[..., :3]))  # alpha dropped
    np.testing.assert_array_equal(images[2].numpy(), as_chw(rgb))


def test_palette_png_is_looked_up_in_its_palette(tmp_path):
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 6), dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.ravel().tolist())
    write(tmp_path / "train" / "a" / "p.png", image)
    write(tmp_path / "train" / "b" / "g.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    images, _ = load(tmp_path, image_size=6)
    np.testing.assert_array_equal(images[0].numpy(), as_chw(palette[index]))  # numpy's lookup


def test_channels_can_be_forced(tmp_path):
    rng = np.random.default_rng(5)
    gray = make_folder(tmp_path, ["a", "b"], rng, size=4, per_class=1, kind="gray")
    rgb = load(tmp_path, image_size=4, channels=3)[0]
    assert rgb.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(rgb[0].numpy(), np.stack([gray["a"][0]] * 3))
    colour = tmp_path / "colour"
    arrays = make_folder(colour, ["a", "b"], rng, size=4, per_class=1)
    luma = load(colour, image_size=4, channels=1)[0]
    assert luma.shape == (2, 1, 4, 4)
    r, g, b = (arrays["a"][0][..., i].astype(np.float64) for i in range(3))
    luma_601 = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601 luma
    np.testing.assert_allclose(luma[0, 0].numpy(), luma_601, atol=1)


def test_jpeg_rgb_and_grayscale_decode_to_their_source_within_compression_error(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([x * 7, y * 7, (x + y) * 3 + 20], axis=2).astype(np.uint8)  # compresses well
    write(tmp_path / "train" / "a" / "rgb.jpg", smooth, quality=95, subsampling=0)
    write(tmp_path / "train" / "b" / "gray.JPG", smooth[..., 0], quality=95)
    images, labels = load(tmp_path, image_size=32)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    error = np.abs(images[0].numpy().astype(int) - as_chw(smooth).astype(int))
    assert error.mean() < 1.5 and error.max() <= 8  # channel order and orientation are right
    gray_error = np.abs(images[1].numpy().astype(int) - smooth[..., 0].astype(int))  # all channels
    assert gray_error.mean() < 1.5 and gray_error.max() <= 8


# ---------------------------------------------------------------- other sizes: crop, resize, a note

@pytest.mark.parametrize("h, w", [(10, 17), (17, 10), (10, 10)])
def test_other_shapes_are_centre_cropped_to_square(tmp_path, capsys, h, w):
    rng = np.random.default_rng(6)
    array = random_rgb(rng, h, w)
    write(tmp_path / "train" / "a" / "x.png", array)
    write(tmp_path / "train" / "b" / "y.png", random_rgb(rng, 10, 10))
    images, _ = load(tmp_path, image_size=10)
    top, left = (h - 10) // 2, (w - 10) // 2  # 17 -> 10: offset 3 (the odd pixel on the far side)
    np.testing.assert_array_equal(images[0].numpy(), as_chw(array[top:top + 10, left:left + 10]))
    note = [line for line in capsys.readouterr().err.splitlines() if "centre-cropped" in line]
    expected = (f"data: 1 of 2 images in {tmp_path / 'train'} are not 10×10: centre-cropped to "
                "square and resized")
    assert note == ([] if h == w else [expected])


def test_resize_averages_like_the_area_mean(tmp_path, capsys):
    """Halving a linear ramp: any symmetric antialiasing filter gives each 2×2 block's mean."""
    y, x = np.mgrid[0:40, 0:60]
    ramp = (x * 2 + y * 3).astype(np.uint8)  # 0..235; 40×60 -> centre 40×40 (columns 10..49) -> 20²
    write(tmp_path / "train" / "a" / "ramp.png", ramp)
    write(tmp_path / "train" / "b" / "flat.png", np.full((7, 5, 3), 77, dtype=np.uint8))
    images, _ = load(tmp_path, image_size=20)
    crop = ramp[:, 10:50].astype(np.float64)
    area_mean = crop.reshape(20, 2, 20, 2).mean(axis=(1, 3))
    inside = (slice(2, -2), slice(2, -2))  # away from the borders
    np.testing.assert_allclose(images[0, 0][inside].numpy(), area_mean[inside], atol=1)
    assert (images[1] == 77).all()  # a flat colour stays flat, at any size
    notes = [line for line in capsys.readouterr().err.splitlines() if "centre-cropped" in line]
    assert len(notes) == 1 and "2 of 2 images" in notes[0]


# ---------------------------------------------------------------- bad input: one line naming it

def bad_folder(root, case, rng):
    """A folder with one thing wrong -> (load kwargs, fragments the one-line message must hold)."""
    def good(name, i=0):
        write(root / "train" / name / f"{i}.png", random_rgb(rng, 4, 4))
    if case == "corrupt png":
        good("a"), good("b")
        noise = bytes(rng.integers(0, 256, 200, dtype=np.uint8))
        (root / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + noise)
        return {}, [str(root / "train" / "b" / "1.png"), "cannot be read as an image"]
    if case == "truncated jpeg":
        good("a"), good("b")
        write(root / "whole.jpg", random_rgb(rng, 64, 64), quality=90)
        whole = (root / "whole.jpg").read_bytes()
        (root / "train" / "a" / "t.jpg").write_bytes(whole[: len(whole) // 2])
        return {}, [str(root / "train" / "a" / "t.jpg"), "cannot be read as an image"]
    if case == "16-bit png":
        good("a")
        deep = rng.integers(0, 65536, (4, 4), dtype=np.uint16)
        write(root / "train" / "b" / "deep.png", Image.fromarray(deep))
        return {}, [str(root / "train" / "b" / "deep.png"), "8 bits"]
    if case == "link to nowhere":
        good("a"), good("b")
        os.symlink(root / "missing.png", root / "train" / "b" / "gone.png")
        return {}, [str(root / "train" / "b" / "gone.png"), "cannot be read"]
    if case == "empty class folder":
        good("a"), good("b")
        (root / "train" / "c").mkdir()
        return {}, [str(root / "train" / "c"), "holds no .png or .jpg images"]
    if case == "no images at all":
        for name in ("a", "b"):
            (root / "train" / name).mkdir(parents=True)
            (root / "train" / name / "readme.txt").write_text("")
        return {}, [str(root / "train" / "a"), "holds no .png or .jpg images"]
    if case == "images but no class folders":
        write(root / "train" / "0.png", random_rgb(rng, 4, 4))
        return {}, [str(root / "train"), "holds no class folders"]
    if case == "one class":
        good("cats"), good("cats", 1)
        return {}, [str(root / "train"), "one class folder (cats)", "at least two classes"]
    if case == "no train folder":
        root.mkdir(parents=True, exist_ok=True)
        return {}, [str(root / "train"), "train/<class>/"]
    if case == "test classes differ":
        good("a"), good("b")
        for name in ("a", "c"):
            write(root / "test" / name / "0.png", random_rgb(rng, 4, 4))
        return {"train": False}, [str(root / "test"), str(root / "train"), "extra: c", "missing: b"]
    raise ValueError(case)


BAD_CASES = ["corrupt png", "truncated jpeg", "16-bit png", "link to nowhere", "empty class folder",
             "no images at all", "images but no class folders", "one class", "no train folder",
             "test classes differ"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_folder_is_a_one_line_error_and_leaves_no_cache(tmp_path, cache, case):
    kwargs, fragments = bad_folder(tmp_path / "d", case, np.random.default_rng(7))
    with pytest.raises(data.DataError) as e:
        load(tmp_path / "d", image_size=4, **kwargs)
    one_line_error(e, *fragments)
    assert cache_files(cache) == []  # nothing written, not even a temporary file


def test_a_test_split_with_the_same_classes_loads(tmp_path):
    rng = np.random.default_rng(8)
    make_folder(tmp_path, ["a", "b"], rng, size=4, per_class=2)
    arrays = make_folder(tmp_path, ["a", "b"], rng, size=4, per_class=1, split="test")
    images, labels = load(tmp_path, train=False, image_size=4)
    np.testing.assert_array_equal(images.numpy(), np.stack([as_chw(arrays[c][0]) for c in "ab"]))
    assert labels.tolist() == [0, 1]


# ---------------------------------------------------------------- the cache

def test_cache_is_written_once_and_reused_without_decoding(tmp_path, cache, monkeypatch, capsys):
    rng = np.random.default_rng(9)
    arrays = make_folder(tmp_path / "d", ["a", "b"], rng, size=4)
    first = load(tmp_path / "d", image_size=4)
    files = cache_files(cache)
    assert len(files) == 1 and files[0].endswith(".npz")
    assert "cached them in" in capsys.readouterr().err
    assert not list((tmp_path / "d").rglob("*.npz"))  # never written into the data folder

    def no_decoding(*args):
        raise AssertionError("decoded although the cache matches")
    monkeypatch.setattr(image_folders, "_decode_image", no_decoding)
    second = load(tmp_path / "d", image_size=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    np.testing.assert_array_equal(second[0][0].numpy(), as_chw(arrays["a"][0]))
    assert capsys.readouterr().err == "" and cache_files(cache) == files


def test_cache_notices_a_changed_added_or_removed_file(tmp_path, cache):
    rng = np.random.default_rng(10)
    make_folder(tmp_path / "d", ["a", "b"], rng, size=4)
    load(tmp_path / "d", image_size=4)
    changed = random_rgb(rng, 4, 4)
    path = tmp_path / "d" / "train" / "b" / "01.png"
    stat = os.stat(path)
    write(path, changed)  # likely the same size (random pixels do not compress); a later time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # file times may be coarse
    images, _ = load(tmp_path / "d", image_size=4)
    np.testing.assert_array_equal(images[4].numpy(), as_chw(changed))
    write(tmp_path / "d" / "train" / "a" / "99.png", changed)
    assert len(load(tmp_path / "d", image_size=4)[1]) == 7
    os.remove(tmp_path / "d" / "train" / "a" / "00.png")
    images, labels = load(tmp_path / "d", image_size=4)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images[2], torch.from_numpy(as_chw(changed)))
    assert len(cache_files(cache)) == 1  # one file per folder, split, size and channel rule


def test_cache_keeps_sizes_and_channel_rules_apart(tmp_path, cache):
    make_folder(tmp_path / "d", ["a", "b"], np.random.default_rng(11), size=6)
    assert load(tmp_path / "d", image_size=6)[0].shape == (6, 3, 6, 6)
    assert load(tmp_path / "d", image_size=4)[0].shape == (6, 3, 4, 4)
    assert load(tmp_path / "d", image_size=6, channels=1)[0].shape == (6, 1, 6, 6)
    assert load(tmp_path / "d", image_size=6)[0].shape == (6, 3, 6, 6)
    assert len(cache_files(cache)) == 3


def test_unreadable_cache_is_decoded_again_and_replaced(tmp_path, cache):
    arrays = make_folder(tmp_path / "d", ["a", "b"], np.random.default_rng(12), size=4)
    load(tmp_path / "d", image_size=4)
    (path,) = cache.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # e.g. a disk that filled up under another program
    images, _ = load(tmp_path / "d", image_size=4)
    np.testing.assert_array_equal(images[0].numpy(), as_chw(arrays["a"][0]))
    assert np.load(path)["images"].shape == (6, 3, 4, 4)


def test_a_failed_cache_write_leaves_nothing_and_the_load_goes_on(tmp_path, cache, monkeypatch,
                                                                   capsys):
    make_folder(tmp_path / "d", ["a", "b"], np.random.default_rng(13), size=4)

    def savez_then_fail(f, **arrays):  # a disk that fills up halfway through the write
        f.write(b"PK\x03\x04 half of a zip file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.np, "savez", savez_then_fail)
    images, _ = load(tmp_path / "d", image_size=4)
    assert images.shape == (6, 3, 4, 4) and cache_files(cache) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and data.CACHE_ENV in err[0]


def test_an_unwritable_cache_folder_is_one_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    # A folder beneath a file: it cannot be created, even by root
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "a_file" / "cache"))
    make_folder(tmp_path / "d", ["a", "b"], np.random.default_rng(14), size=4)
    assert load(tmp_path / "d", image_size=4)[0].shape == (6, 3, 4, 4)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot cache them" in err[0]


def test_cache_folder_follows_the_environment(monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, "/x/cfg")
    assert image_folders.cache_folder() == "/x/cfg"
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/y")
    assert image_folders.cache_folder() == os.path.join("/y", "cfg-diffusion")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/z")
    assert image_folders.cache_folder() == os.path.join("/home/z", ".cache", "cfg-diffusion")


# ---------------------------------------------------------------- CIFAR-10 as an image folder

def make_cifar_folder(root, rng, splits=("train",)):
    """root/<split>/<class>/0.png for CIFAR-10's ten classes -> {split: images in label order}."""
    arrays = {}
    for split in splits:
        arrays[split] = [random_rgb(rng, 32, 32) for _ in CIFAR10]
        for name, array in zip(CIFAR10, arrays[split]):
            write(root / split / name / "0.png", array)
    return arrays


@pytest.mark.parametrize("where", ["data_dir", "data_dir/cifar10"])
def test_cifar10_reads_an_image_folder_where_there_is_no_archive(tmp_path, where):
    root = tmp_path if where == "data_dir" else tmp_path / "cifar10"
    arrays = make_cifar_folder(root, np.random.default_rng(15), splits=("train", "test"))
    for train, split in ((True, "train"), (False, "test")):
        images, labels = data.load_dataset("cifar10", str(tmp_path), train=train)
        assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
        np.testing.assert_array_equal(images.numpy(), np.stack([as_chw(a) for a in arrays[split]]))
    assert data.class_names("cifar10", str(tmp_path)) == CIFAR10 == tuple(sorted(CIFAR10))


def test_cifar10_training_split_never_reads_the_test_folder(tmp_path):
    make_cifar_folder(tmp_path, np.random.default_rng(16))
    (tmp_path / "test" / "only-one-class").mkdir(parents=True)  # training never looks at it
    (tmp_path / "test" / "only-one-class" / "x.png").write_bytes(b"not a png")
    assert data.load_dataset("cifar10", str(tmp_path))[0].shape == (10, 3, 32, 32)
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", str(tmp_path), train=False)
    one_line_error(e, str(tmp_path / "test"))


def test_cifar10_folder_with_grayscale_or_other_sizes_is_still_3x32x32(tmp_path):
    rng = np.random.default_rng(17)
    make_cifar_folder(tmp_path, rng)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    write(tmp_path / "train" / "cat" / "1.png", gray)
    write(tmp_path / "train" / "dog" / "1.png", random_rgb(rng, 40, 48))
    images, labels = data.load_dataset("cifar10", str(tmp_path))
    assert images.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(images[4].numpy(), np.stack([gray] * 3))  # cat (3): 0.png, 1.png


def test_cifar10_folder_needs_the_ten_class_names(tmp_path):
    rng = np.random.default_rng(18)
    for name in CIFAR10[:9] + ("lorry",):
        write(tmp_path / "train" / name / "0.png", random_rgb(rng, 32, 32))
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", str(tmp_path))
    one_line_error(e, str(tmp_path / "train"), "extra: lorry", "missing: truck", "imagefolder")


def test_cifar10_archive_wins_over_an_image_folder(tmp_path, monkeypatch):
    from official_formats import cifar_tar_gz
    rng = np.random.default_rng(19)
    batches = {name: (rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 2))
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tar_gz(batches))
    make_cifar_folder(tmp_path, rng)
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9")  # no download
    images, labels = data.load_dataset("cifar10", str(tmp_path))
    np.testing.assert_array_equal(images[:2].numpy(), batches["data_batch_1"][0])


def test_class_names_of_the_named_datasets():
    digits = tuple(str(i) for i in range(10))
    assert data.class_names("digits") == data.class_names("mnist") == digits
    fashion = data.class_names("fashion-mnist")
    assert fashion[0] == "T-shirt/top" and len(fashion) == 10
    with pytest.raises(data.DataError):
        data.class_names("imagenet")


# ---------------------------------------------------------------- real CIFAR-10 JPEGs, if present

@pytest.mark.slow
def test_real_cifar10_jpeg_folder_counts():
    """Counts files only (decoding all 50,000 is slow): 10 classes in CIFAR-10's label order."""
    root = shared_data("cifar10-jpeg")
    for split, per_class in (("train", 5000), ("test", 1000)):
        split_dir = os.path.join(root, split)
        assert tuple(image_folders.folder_classes(split_dir)) == CIFAR10
        paths, labels = image_folders._image_files(split_dir, CIFAR10)
        assert len(paths) == 10 * per_class and np.bincount(labels).tolist() == [per_class] * 10
        with Image.open(os.path.join(split_dir, paths[0])) as image:
            assert image.size == (32, 32) and image.mode == "RGB"

"""Tests for data.py: loaders on synthetic files in the official formats, downloads from 127.0.0.1.

The synthetic files come from independent minimal writers of the published formats
(tests/official_formats.py: IDX, a big-endian header then bytes, gzipped; CIFAR-10, a tar.gz of
Python 2 protocol-2 pickles assembled opcode by opcode), so a loader that misreads a format fails.

Run: python -m pytest -q tests/test_data.py
"""
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import stat
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch
from conftest import shared_data
from official_formats import cifar_tar_gz, idx_gz, py2_cifar_batch, py2_str

import data

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR = "cifar-10-python.tar.gz"


def md5(blob):
    return hashlib.md5(blob).hexdigest()


# ---------------------------------------------------------------- synthetic data, a local server

@pytest.fixture(scope="module")
def synthetic():
    """{dataset: {"files": {name: bytes}, "train": (images, labels), "test": (images, labels)}}."""
    rng = np.random.default_rng(0)
    out = {}
    for name, n_train, n_test in (("mnist", 30, 10), ("fashion-mnist", 20, 12)):
        split = {s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, n, dtype=np.uint8))
                 for s, n in (("train", n_train), ("t10k", n_test))}
        kinds = ((0, "images-idx3-ubyte.gz"), (1, "labels-idx1-ubyte.gz"))
        files = {f"{s}-{kind}": idx_gz(split[s][k]) for s in split for k, kind in kinds}
        out[name] = {"files": files, "train": split["train"], "test": split["t10k"]}
    batches = {name: (rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 4))
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    train = tuple(np.concatenate([batches[f"data_batch_{i}"][k] for i in range(1, 6)])
                  for k in (0, 1))
    out["cifar10"] = {"files": {CIFAR: cifar_tar_gz(batches)}, "train": train,
                      "test": batches["test_batch"]}
    return out


class Server:
    """HTTP on 127.0.0.1 serving /<dataset>/<file>; `plan[path]`: how to (mis)behave next."""

    def __init__(self, synthetic):
        self.files = {f"/{name}/{f}": blob
                      for name, d in synthetic.items() for f, blob in d["files"].items()}
        self.plan, self.requests = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                body = server.files.get(self.path)
                if body is None:
                    return self.send_error(404)
                mode = server.plan.get(self.path, []).pop(0) if server.plan.get(self.path) else "ok"
                if mode == "truncated":  # a short file, announced with its short length
                    body = body[: len(body) // 2]
                elif mode == "corrupt":  # the right length, one bit wrong
                    body = body[:-1] + bytes([body[-1] ^ 1])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "close_early":  # promises len(body) bytes, sends half, hangs up
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()


@pytest.fixture
def server(synthetic, monkeypatch):
    """A local mirror of the synthetic files, the entries' MD5s set to theirs, no retry delay."""
    for name in ("mnist", "fashion-mnist", "cifar10"):
        files, entry = synthetic[name]["files"], data.DATASETS[name]
        splits = {train: tuple((f, md5(files[f])) for f, _ in entry.files[train])
                  for train in (True, False)}
        monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(entry, files=splits))
    monkeypatch.setattr(data, "RETRY_DELAY_S", 0.0)
    s = Server(synthetic)
    monkeypatch.setenv(data.MIRROR_ENV, s.url)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def assert_one_line_data_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def check_split(images, labels, expected, name):
    """Loaded tensors against the arrays the synthetic files were written from."""
    ref_images, ref_labels = expected
    channels = 3 if name == "cifar10" else 1
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (len(ref_labels), channels, *ref_images.shape[-2:])
    np.testing.assert_array_equal(images.numpy(), ref_images.reshape(images.shape))
    np.testing.assert_array_equal(labels.numpy(), ref_labels.astype(np.int64))


# ---------------------------------------------------------------- pixel scaling

def test_to_model_range_and_back_is_exact_for_every_uint8_value():
    u = torch.arange(256, dtype=torch.uint8)
    x = data.to_model_range(u)
    assert x.dtype == torch.float32
    reference = np.arange(256, dtype=np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(x.numpy(), reference, rtol=0, atol=1e-6)
    assert x[0] == -1.0 and x[-1] == 1.0
    assert torch.equal(data.to_uint8(x), u)
    assert torch.equal(data.to_uint8(x.double()), u)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 1.0, 7.0, 0.0, 1 / 127.5 * 0.49 - 1, 1 / 127.5 * 0.51 - 1])
    assert data.to_uint8(x).tolist() == [0, 0, 255, 255, 128, 0, 1]  # 127.5 rounds to even 128


# ---------------------------------------------------------------- digits, names

def test_digits_are_sklearn_digits_scaled_to_255():
    from sklearn.datasets import load_digits
    ref = load_digits()
    images, labels = data.load_dataset("digits")
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    v = ref.images.astype(np.int64)  # integers 0..16
    np.testing.assert_array_equal(images[:, 0].numpy(), (v * 255 + 8) // 16)  # round(v·255/16)
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(labels.numpy(), ref.target)


def test_digits_test_split_and_unknown_name_are_one_line_errors():
    with pytest.raises(data.DataError) as e:
        data.load_dataset("digits", train=False)
    assert_one_line_data_error(e, "no test split")
    with pytest.raises(data.DataError) as e:
        data.load_dataset("imagenet")
    assert_one_line_data_error(e, "'imagenet'", "digits, mnist, fashion-mnist, cifar10")
    assert issubclass(data.DataError, ValueError)


# ---------------------------------------------------------------- downloads

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_download_round_trip_leaves_only_the_files(server, synthetic, tmp_path, name):
    for train, split in ((True, "train"), (False, "test")):
        images, labels = data.load_dataset(name, str(tmp_path), train=train)
        check_split(images, labels, synthetic[name][split], name)
    expected = [CIFAR] if name == "cifar10" else sorted(IDX_FILES)
    assert sorted(os.listdir(tmp_path / name)) == expected  # no temporary files left behind
    assert os.listdir(tmp_path) == [name]
    for f in expected:
        assert (tmp_path / name / f).read_bytes() == synthetic[name]["files"][f]
    # Present files are used as they are: a second load makes no request
    before = dict(server.requests)
    check_split(*data.load_dataset(name, str(tmp_path)), synthetic[name]["train"], name)
    assert server.requests == before


def test_mnist_and_fashion_mnist_share_a_data_dir(server, synthetic, tmp_path):
    """Same file names, different data: each lands in its own data_dir/<name>/ and loads as itself,
    and data_dir/<name>/ wins over files placed directly in data_dir."""
    for name in ("mnist", "fashion-mnist", "mnist"):
        check_split(*data.load_dataset(name, str(tmp_path)), synthetic[name]["train"], name)
    place(tmp_path, synthetic, "mnist")
    fashion = data.load_dataset("fashion-mnist", str(tmp_path))
    check_split(*fashion, synthetic["fashion-mnist"]["train"], "fashion-mnist")


@pytest.mark.parametrize("mode", ["truncated", "corrupt", "close_early"])
def test_bad_transfer_is_retried_and_never_used(server, synthetic, tmp_path, mode):
    path = "/mnist/train-images-idx3-ubyte.gz"
    server.plan[path] = [mode]  # first answer bad, second good
    check_split(*data.load_dataset("mnist", str(tmp_path)), synthetic["mnist"]["train"], "mnist")
    assert server.requests[path] == 2
    assert sorted(os.listdir(tmp_path / "mnist")) == list(IDX_FILES[:2])


@pytest.mark.parametrize("mode", ["truncated", "corrupt", "close_early"])
def test_persistently_bad_transfer_is_reported_and_leaves_nothing(server, tmp_path, mode, capsys):
    path = f"/cifar10/{CIFAR}"
    server.plan[path] = [mode] * data.DOWNLOAD_ATTEMPTS
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", str(tmp_path))
    reason = {"truncated": "MD5", "corrupt": "MD5", "close_early": "connection closed after"}[mode]
    assert_one_line_data_error(e, f"{data.DOWNLOAD_ATTEMPTS} attempts", reason, CIFAR,
                               data.DATASETS["cifar10"].url)
    assert server.requests[path] == data.DOWNLOAD_ATTEMPTS
    assert os.listdir(tmp_path / "cifar10") == []  # neither the file nor a temporary one
    assert capsys.readouterr().err.count("trying again") == data.DOWNLOAD_ATTEMPTS - 1


def test_http_error_is_reported(server, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, server.url + "/missing")
    with pytest.raises(data.DataError) as e:
        data.load_dataset("fashion-mnist", str(tmp_path))
    assert_one_line_data_error(e, "404", f"{IDX_FILES[0]} and {IDX_FILES[1]}")


def test_no_network_names_the_files_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())
    for name, files in (("mnist", IDX_FILES[:2]), ("cifar10", (CIFAR,))):
        with pytest.raises(data.DataError) as e:
            data.load_dataset(name, str(tmp_path / "data"))
        message = assert_one_line_data_error(e, *files, data.DATASETS[name].url,
                                             str(tmp_path / "data" / name))
        assert "place" in message
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- files already on disk

def place(folder, synthetic, name, **replace):
    folder.mkdir(parents=True, exist_ok=True)
    for f, blob in {**synthetic[name]["files"], **replace}.items():
        (folder / f).write_bytes(blob)


def snapshot(folder):
    """The folder's and its files' modification times: equal snapshots mean nothing was written."""
    return os.stat(folder).st_mtime_ns, {f: os.stat(os.path.join(folder, f)).st_mtime_ns
                                         for f in os.listdir(folder)}


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_read_only_folder_works_when_nothing_is_missing(synthetic, tmp_path, monkeypatch, name):
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())  # any download attempt would fail
    place(tmp_path / "ro", synthetic, name)  # the files in data_dir itself, not data_dir/<name>/
    os.chmod(tmp_path / "ro", stat.S_IRUSR | stat.S_IXUSR)
    try:
        before = snapshot(tmp_path / "ro")
        for train, split in ((True, "train"), (False, "test")):
            loaded = data.load_dataset(name, str(tmp_path / "ro"), train=train)
            check_split(*loaded, synthetic[name][split], name)
        assert snapshot(tmp_path / "ro") == before  # nothing written, not even a folder
    finally:
        os.chmod(tmp_path / "ro", stat.S_IRWXU)


def test_corrupt_file_on_disk_is_moved_aside_and_fetched_again(server, synthetic, tmp_path):
    good = synthetic["mnist"]["files"]["train-labels-idx1-ubyte.gz"]
    place(tmp_path / "mnist", synthetic, "mnist", **{"train-labels-idx1-ubyte.gz": good[:-10]})
    check_split(*data.load_dataset("mnist", str(tmp_path)), synthetic["mnist"]["train"], "mnist")
    assert (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes() == good
    assert (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz.corrupt").read_bytes() == good[:-10]
    assert server.requests == {"/mnist/train-labels-idx1-ubyte.gz": 1}


def _bad_idx_files(synthetic):
    images, labels = synthetic["mnist"]["train"]
    img, lab = IDX_FILES[:2]
    raw_images = gzip.decompress(synthetic["mnist"]["files"][img])
    gz_labels = synthetic["mnist"]["files"][lab]
    bad_labels = labels.copy()
    bad_labels[3] = 10
    return {
        "truncated gzip": (lab, gz_labels[:-5], "gzip"),
        "gzip CRC": (lab,  # flip a bit of the stored CRC-32
                     gz_labels[:-8] + bytes([gz_labels[-8] ^ 1]) + gz_labels[-7:], "gzip"),
        "not gzip": (img, raw_images, "gzip"),
        "wrong magic": (img, gzip.compress(b"\x00\x00\x08\x01" + raw_images[4:]), "magic"),
        "fewer bytes": (img, gzip.compress(raw_images[:-28]), "header says"),
        "more bytes": (img, gzip.compress(raw_images + bytes(28)), "header says"),
        "label 10": (lab, idx_gz(bad_labels), "0..9"),
    }


@pytest.mark.parametrize("case", ["truncated gzip", "gzip CRC", "not gzip", "wrong magic",
                                  "fewer bytes", "more bytes", "label 10"])
def test_corrupt_file_in_read_only_folder_is_named(synthetic, tmp_path, monkeypatch, case):
    file, blob, reason = _bad_idx_files(synthetic)[case]
    place(tmp_path, synthetic, "mnist", **{file: blob})
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root ignores permission bits: make moving the file aside fail anyway
        def refuse(src, dst):
            raise PermissionError(13, "Permission denied", src)
        monkeypatch.setattr(data.os, "replace", refuse)
    try:
        with pytest.raises(data.DataError) as e:
            data.load_dataset("mnist", str(tmp_path))
        assert_one_line_data_error(e, str(tmp_path / file), reason, "cannot be moved aside")
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)


def test_image_and_label_counts_must_agree(synthetic, tmp_path):
    images, labels = synthetic["mnist"]["train"]
    place(tmp_path, synthetic, "mnist", **{"train-labels-idx1-ubyte.gz": idx_gz(labels[:-1])})
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", str(tmp_path))
    assert_one_line_data_error(e, f"{len(images)} images", f"{len(labels) - 1} labels")


def test_cifar_pickle_with_code_is_refused(synthetic, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(" + py2_str(f"touch {marker}".encode()) + b"tR."
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(evil)
            tar.addfile(info, io.BytesIO(evil))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / CIFAR).write_bytes(buf.getvalue())
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())
    with pytest.raises(data.DataError):
        data.load_dataset("cifar10", str(tmp_path / "d"))
    assert not marker.exists()


def test_py2_pickle_writer_matches_pickle():
    """The hand-assembled Python 2 pickle is valid and holds what it should (checks the writer)."""
    rows = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    d = pickle.loads(py2_cifar_batch(b"b1", [3, 7], rows, [b"a.png", b"b.png"]), encoding="bytes")
    assert d[b"batch_label"] == b"b1" and d[b"labels"] == [3, 7]
    assert d[b"filenames"] == [b"a.png", b"b.png"]
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (2, 3072)
    np.testing.assert_array_equal(d[b"data"], rows)


# ---------------------------------------------------------------- the real files on this machine

def read_idx_reference(path):
    """An independent IDX reader: struct for the header, numpy for the body."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and dtype == 0x08
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


@pytest.mark.slow
def test_real_mnist_4k_read_only_folder(monkeypatch):
    MNIST_4K = shared_data("mnist-4k")
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())
    before = snapshot(MNIST_4K)
    images, labels = data.load_dataset("mnist", MNIST_4K)
    assert images.shape == (4000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [400] * 10
    reference_images = read_idx_reference(f"{MNIST_4K}/train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(images[:, 0].numpy(), reference_images)
    reference_labels = read_idx_reference(f"{MNIST_4K}/train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(labels.numpy(), reference_labels)
    assert snapshot(MNIST_4K) == before
    with pytest.raises(data.DataError):  # the folder has no t10k files and there is no network
        data.load_dataset("mnist", MNIST_4K, train=False)
    assert snapshot(MNIST_4K) == before


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_folder(monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, closed_port_url())
    images, labels = data.load_dataset("fashion-mnist", DEBIAN_FASHION)
    assert images.shape == (60000, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    reference_labels = read_idx_reference(f"{DEBIAN_FASHION}/train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(labels.numpy(), reference_labels)
    reference_images = read_idx_reference(f"{DEBIAN_FASHION}/train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(images[::997, 0].numpy(), reference_images[::997])

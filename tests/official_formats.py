"""Independent minimal writers of the datasets' official file formats, for synthetic test data.

They follow the published formats, not data.py's reader, so a loader that misreads a format fails:
- IDX (MNIST, Fashion-MNIST): magic 0x00 0x00 0x08 ndim, each dimension as big-endian uint32, then
  the bytes, gzipped;
- CIFAR-10 python version: a tar.gz of cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}, each a Python 2 protocol-2 pickle, hand-assembled here opcode by opcode.

Used by tests/test_data.py and by scripts/gpu_check.py (a small CIFAR-10 file in the real format).
"""
import gzip
import io
import struct
import tarfile

import numpy as np


def idx_gz(array):
    """IDX: magic 0x00 0x00 0x08 (unsigned byte) ndim, each dimension as big-endian uint32,
    then the bytes."""
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header = magic + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def py2_str(b):
    """A Python 2 str in a protocol-2 pickle: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def py2_int(i):
    """A Python 2 int in a protocol-2 pickle: BININT."""
    return b"J" + struct.pack("<i", i)


def py2_cifar_batch(batch_label, labels, rows, filenames):
    """The protocol-2 pickle Python 2's cPickle writes for
    {'batch_label', 'labels', 'data', 'filenames'}."""
    n, d = rows.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
             + py2_int(0) + b"\x85" + py2_str(b"b") + b"\x87R("
             + py2_int(1) + py2_int(n) + py2_int(d) + b"\x86"  # state: version, shape,
             + b"cnumpy\ndtype\n" + py2_str(b"u1") + py2_int(0) + py2_int(1) + b"\x87R"  # uint8,
             + b"(" + py2_int(3) + py2_str(b"|") + b"NNN"
             + py2_int(-1) + py2_int(-1) + py2_int(0) + b"tb"
             + b"\x89" + py2_str(rows.tobytes()) + b"tb")  # C order, raw bytes
    items = [(b"batch_label", py2_str(batch_label)),
             (b"labels", b"](" + b"".join(py2_int(int(y)) for y in labels) + b"e"),
             (b"data", array),
             (b"filenames", b"](" + b"".join(py2_str(f) for f in filenames) + b"e")]
    return b"\x80\x02}(" + b"".join(py2_str(k) + v for k, v in items) + b"u."


def cifar_rows(images):
    """(N, 3, 32, 32) -> (N, 3072) rows as the CIFAR-10 page describes: 1024 red, 1024 green,
    1024 blue."""
    return np.stack([np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()])
                     for img in images])


def cifar_tar_gz(batches):
    """batches: {"data_batch_1": (images, labels), ...} -> bytes of cifar-10-python.tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {"batches.meta": b"\x80\x02}(U\x0blabel_namesq](U\x08airplaneeu."}
        for name, (images, labels) in batches.items():
            members[name] = py2_cifar_batch(name.encode(), labels, cifar_rows(images),
                                            [f"img_{i}.png".encode() for i in range(len(labels))])
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()

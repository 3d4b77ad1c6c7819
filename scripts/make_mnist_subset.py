"""Make an mnist-4k-like folder: a class-balanced random subset of MNIST's training split.

mnist-4k, the dataset of notebooks 02, 04 and 05 and of the MNIST results in docs/results.md,
is 4,000 real MNIST training digits, 400 per class, drawn at random from the official
training split and stored as the two official IDX files. This script makes such a folder:

1. it reads the official training files with data.load_dataset("mnist", --data-dir), which
   downloads and checks them when missing (60,000 images, about 10 MB);
2. for each class, a numpy Generator seeded with --seed draws --per-class images without
   replacement, then puts all of them in one random order (so the last images of a class,
   which train.py holds out for the metrics, are a random draw too);
3. it writes train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz into --out, each
   under a temporary name first, then renamed: a run cut short leaves no half-written file.

    python scripts/make_mnist_subset.py --out data/mnist-4k  # downloads MNIST to ./data
    python train.py --dataset mnist --data-dir data/mnist-4k

The same seed gives the same folder, byte for byte. It is comparable with the project's own
mnist-4k, not identical (another random draw): expect figures near those of docs/results.md.
"""
import functools
import gzip
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import data  # noqa: E402

IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


def draw(labels, per_class, seed):
    """Indices of `per_class` images of each class, without replacement, in one random order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(10):
        index = np.flatnonzero(labels == c)
        if len(index) < per_class:
            raise ValueError(f"class {c} has only {len(index)} images in the source: "
                             f"cannot draw {per_class}")
        chosen.append(rng.choice(index, size=per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def idx_bytes(array):
    """The official IDX format: 0x00 0x00, 0x08 (unsigned bytes), the number of dimensions,
    each dimension as a big-endian uint32, then the data in C order; gzipped with a zero
    timestamp, so equal arrays give equal files."""
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0)


fail = functools.partial(cli.fail, prog="make_mnist_subset.py")


def main(argv=None):
    p = cli.parser("make_mnist_subset.py", __doc__)
    p.add_argument("--out", required=True, help="folder for the two IDX files (created if missing)")
    p.add_argument("--data-dir", default="./data", help="where the official MNIST training "
                   "files are, or are downloaded to (default ./data)")
    p.add_argument("--per-class", type=cli.number(int, 1), default=400,
                   help="images per class (default 400: mnist-4k's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the numpy Generator that draws them (default 0)")
    args = p.parse_args(argv)
    try:
        images, labels = data.load_dataset("mnist", args.data_dir)  # (N, 1, 28, 28), (N,)
        chosen = draw(labels.numpy(), args.per_class, args.seed)
    except (data.DataError, ValueError) as e:
        fail(str(e))
    os.makedirs(args.out, exist_ok=True)
    for name, array in ((LABELS, labels[chosen].numpy().astype(np.uint8)),
                        (IMAGES, images[chosen, 0].numpy())):  # (n,), (n, 28, 28)
        cli.atomic_write(os.path.join(args.out, name), lambda f: f.write(idx_bytes(array)))
    print(f"{len(chosen):,} of {len(labels):,} MNIST training digits ({args.per_class} per "
          f"class, seed {args.seed}) -> {os.path.join(args.out, IMAGES)}, "
          f"{os.path.join(args.out, LABELS)}")


if __name__ == "__main__":
    main()

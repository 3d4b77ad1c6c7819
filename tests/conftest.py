"""Makes the flat top-level modules (schedule, model, data, train, ...) importable from tests;
the fixtures and helpers that several test files share."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized tensors: one thread avoids oversubscribing the shared machine (and is faster).
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for one test (the samplers then draw and step in float64)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def assert_one_line_exit_2(main, argv, capsys, prefix):
    """main(argv) exits with code 2 and one stderr line starting with `prefix`; returns it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(prefix) and "Traceback" not in err, err
    return err


# Real datasets CI keeps beside the checkout (../shared/data/<name>); a fresh clone has none.
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
SHARED_DATASETS = {
    "mnist-4k": "4,000 real MNIST training digits, 400 per class",
    "fashion-mnist": "the full Fashion-MNIST in the official IDX format",
    "cifar10-jpeg": "the full CIFAR-10 as JPEG files",
}


def shared_data(name, hint=""):
    """The folder ../shared/data/<name> beside the checkout. If absent, the calling test is skipped
    with a reason naming the folder, what it holds and `hint` (how to run the test without it)."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"needs ../shared/data/{name} ({SHARED_DATASETS[name]}); not in this checkout"
                    + (f"; {hint}" if hint else ""))
    return path


def judge(dataset):
    """A classifier of `dataset`'s images that no diffusion model trained with: the shipped
    metrics classifier, or for the 8×8 digits the nearest class mean of scikit-learn's images.
    Returns images uint8 (N, C, H, W) -> predicted classes (N,)."""
    if dataset == "digits":
        import numpy as np
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        means = torch.tensor(np.stack([x[y == c].mean(0) for c in range(10)]) * 255 / 16)
        return lambda images: torch.cdist(images.reshape(len(images), -1).double(),
                                          means).argmin(1)
    import metric_nets
    import metrics
    clf = metric_nets.load_classifier(f"metrics-{dataset}", dataset=dataset)
    return lambda images: metrics.classifier_probs(clf, images).argmax(1)

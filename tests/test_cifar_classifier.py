"""The CIFAR-10 metrics classifier (metric_nets.py) and metrics.py's commands, on small synthetic
data written here.

References independent of the code under test: parameter counts from the layer formulas, a
brute-force search for each random translation, closed-form values of the one-cycle schedule,
scipy's sqrtm FID and the entropy form of IS on features computed directly, and accuracies
recomputed from the saved network; the --json results are checked against the same computations.
A toy whose class is a colour must be learnt (an untrained network scores chance on it). Old MNIST
classifier files (written here in their format: no "arch") must still load.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_cifar_classifier.py
"""
import json
import sys
import types

import numpy as np
import pytest
import torch
from official_formats import idx_gz
from PIL import Image
from test_metrics import fid_scipy, inception_score_entropy_form

import data
import metric_nets
import metrics

pytestmark = pytest.mark.usefixtures("one_thread")
CIFAR10 = data.DATASETS["cifar10"].classes


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A decode cache of this test's own (never ~/.cache)."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def conv_bn_params(c_in, c_out):
    return 9 * c_in * c_out + 2 * c_out  # 3×3 weights (no bias), BatchNorm's scale and shift


def fails(argv, capsys):
    """metrics.main(argv) must stop with exit code 2: its stderr."""
    with pytest.raises(SystemExit) as exit:
        metrics.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


def test_cifar_classifier_shapes_and_architecture():
    torch.manual_seed(0)
    clf = metric_nets.CifarClassifier()
    a, b, c, d = metric_nets.CifarClassifier.WIDTHS
    expected = (conv_bn_params(3, a) + conv_bn_params(a, b) + 2 * conv_bn_params(b, b)
                + conv_bn_params(b, c) + conv_bn_params(c, d) + 2 * conv_bn_params(d, d)
                + d * 10 + 10)
    assert sum(p.numel() for p in clf.parameters()) == expected
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    x = images.float() / 127.5 - 1
    assert clf(x).shape == (5, 10)
    feats, probs = metrics.classifier_outputs(clf, images, batch_size=2)
    assert feats.shape == (5, d) and probs.shape == (5, 10)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
    with torch.no_grad():  # the features: the last block's activations averaged over 4×4 places
        last = clf.convs(x)
        assert last.shape == (5, d, 4, 4)
        assert torch.allclose(feats, last.flatten(2).sum(2) / 16, atol=1e-5)
        assert torch.allclose(probs, torch.softmax(clf.head(feats), 1), atol=1e-6)
    # floats in [-1, 1] are quantised to uint8 first, as for the MNIST classifier
    assert torch.allclose(metrics.classifier_probs(clf, x), probs, atol=1e-6)
    small = metric_nets.CifarClassifier(widths=(4, 8, 8, 16))
    assert metrics.classifier_features(small, images).shape == (5, 16)


def test_random_shift_is_a_translation_and_random_flip_a_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 6, 5) * 2 - 1
    shifted = metric_nets.random_shift(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    offsets = set()
    for i in range(len(x)):  # brute force: the offset (dy, dx) of the padded image's crop it equals
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(shifted[i], padded[i, :, dy:dy + 6, dx:dx + 5])]
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 10  # many of the 25 offsets are drawn
    flipped = metric_nets.random_flip(x, g)
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x))]
    assert all(m or torch.equal(flipped[i], x[i]) for i, m in enumerate(mirrored))
    assert 10 <= sum(mirrored) <= 30


def test_one_cycle_closed_form():
    # up linearly to 1 over the first quarter, then down linearly to 0
    for progress, factor in [(0, 0), (0.125, 0.5), (0.25, 1), (0.625, 0.5), (1, 0)]:
        assert metric_nets.one_cycle(progress) == pytest.approx(factor)


# ---------------------------------------------------------------- a learnable toy

# the eight corners of the RGB cube, orange and violet
PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                        [255, 0, 255], [0, 255, 255], [255, 255, 255], [255, 128, 0],
                        [128, 0, 255]])


def colour_toy(n, seed):
    """n 32×32 images whose class c is the colour PALETTE[c] of a square at a random place, on
    noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g).to(torch.uint8)
    for i, c in enumerate(labels.tolist()):
        top, left = torch.randint(0, 17, (2,), generator=g).tolist()
        images[i, :, top:top + 16, left:left + 16] = PALETTE[c][:, None, None]
    return images, labels


@pytest.mark.slow
def test_colour_toy_is_learnt_quickly():
    images, labels = colour_toy(200, seed=0)
    test_x, test_y = colour_toy(100, seed=1)
    torch.manual_seed(0)
    untrained = metric_nets.CifarClassifier(widths=(8, 16, 16, 32))
    assert metrics.accuracy(untrained, test_x, test_y) < 0.4  # high accuracy is not given
    log = []
    clf = metric_nets.train_cifar_classifier(images, labels, epochs=12, batch_size=20, lr=0.4,
                                             widths=(8, 16, 16, 32), log=log.append)
    assert len(log) == 12 and log[-1].startswith("epoch 12/12  train loss")
    assert not clf.training  # evaluated as the eval-mode network, with BatchNorm's running stats
    assert metrics.accuracy(clf, test_x, test_y) >= 0.9


# ---------------------------------------------------------------- the commands on a tiny CIFAR-10

def write_cifar_folder(root, per_class, seed):
    """root/{train,test}/<class>/<i>.{jpg,png}: the colour toy, JPEG for train and PNG for test."""
    for split, n, ext in (("train", per_class[0], "jpg"), ("test", per_class[1], "png")):
        images, labels = colour_toy(10 * n, seed=seed + (split == "test"))
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            path = root / split / CIFAR10[label] / f"{i:03d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def write_npz(path, images, labels, w):
    """Samples as `sample.py --npz` writes them: (N, H, W, C) uint8 images, w in float32."""
    np.savez(path, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
             w=np.asarray(w, dtype=np.float32))


def test_train_classifier_command_on_an_image_folder(tmp_path, capsys):
    write_cifar_folder(tmp_path / "cifar", per_class=(3, 2), seed=0)
    path, result = tmp_path / "clf.pt", tmp_path / "train.json"
    assert metrics.main(["train-classifier", "--dataset", "cifar10", "--data-dir",
                         str(tmp_path / "cifar"), "--epochs", "2", "--out", str(path),
                         "--json", str(result)]) == 0
    out = capsys.readouterr().out
    assert "training on 30 cifar10 images; testing on the 20-image test split" in out
    assert "epoch 1/2  train loss" in out and "epoch 2/2  train loss" in out
    saved = torch.load(path, weights_only=True)
    assert saved["dataset"] == "cifar10" and saved["test_split"] == "the 20-image test split"
    assert saved["arch"] == "CifarClassifier" and saved["args"]["epochs"] == 2
    clf = metric_nets.load_classifier(str(path), dataset="cifar10")
    assert isinstance(clf, metric_nets.CifarClassifier) and not clf.training
    test_x, test_y = data.load_dataset("cifar10", str(tmp_path / "cifar"), train=False)
    with torch.no_grad():
        recomputed = (clf(test_x.float() / 127.5 - 1).argmax(1) == test_y).double().mean().item()
    assert saved["test_accuracy"] == pytest.approx(recomputed)
    assert f"test accuracy {recomputed:.4f} on the 20-image test split" in out
    assert not list(tmp_path.glob("clf.pt.tmp*"))  # written through a temporary file, renamed
    # --json: the same figures, for programs
    written = json.loads(result.read_text())
    assert set(written) == {"test_accuracy", "test_split", "seconds", "path", "dataset"}
    assert written["test_accuracy"] == pytest.approx(recomputed)
    assert written["test_split"] == "the 20-image test split" and written["dataset"] == "cifar10"
    assert written["path"] == str(path) and written["seconds"] > 0
    assert f"({written['seconds']:.0f} s); saved {path}" in out
    assert not list(tmp_path.glob("train.json.*"))  # written through a temporary file, renamed


def table(out):
    """{first column (w, or "real"): the numbers of its row} of the table `metrics.py` prints."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and (parts[0] == "real" or parts[0].replace(".", "").isdigit()):
            rows[parts[0]] = [float(v) for v in parts[1:6]]
    return rows


def json_table(path):
    """The --json of `metrics.py cifar10 / mnist` as table() reads the printed table: {w: [n, fid,
    is, is_std, accuracy]} with w as printed, and "real"; and the description line."""
    result = json.loads(path.read_text())
    assert set(result) == {"what", "rows", "real"}
    keys = ["n", "fid", "is", "is_std", "accuracy"]
    assert all(set(row) == {"w", *keys} for row in result["rows"])
    rows = {f"{row['w']:.2f}": [row[k] for k in keys] for row in result["rows"]}
    if result["real"] is not None:
        assert set(result["real"]) == set(keys)
        rows["real"] = [result["real"][k] for k in keys]
    return rows, result


def test_cifar10_metrics_command_against_an_independent_computation(tmp_path, capsys):
    write_cifar_folder(tmp_path / "cifar", per_class=(1, 8), seed=2)  # test split 80: 40 and 40
    torch.manual_seed(0)
    clf = metric_nets.CifarClassifier(widths=(4, 4, 4, 4))  # 4-d features: full rank
    # Untrained, it maps every image to nearly one point (FID ≈ 0, IS ≈ 1 for any images): take
    # BatchNorm's statistics from toy images and sharpen the head, so that the figures tell
    # one set of images from another.
    with torch.no_grad():
        for layer in clf.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = None  # the running statistics: the plain mean over batches
        clf.train()(colour_toy(100, seed=8)[0].float() / 127.5 - 1)
        clf.fc.weight *= 30
    clf.eval()
    metric_nets.save_classifier(clf, str(tmp_path / "clf.pt"), dataset="cifar10")
    images, labels = colour_toy(60, seed=3)
    write_npz(tmp_path / "s.npz", images, labels, np.repeat([0.0, 1.5], 30))
    assert metrics.main(["cifar10", "--npz", str(tmp_path / "s.npz"), "--data-dir",
                         str(tmp_path / "cifar"), "--classifier", str(tmp_path / "clf.pt"),
                         "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "project's classifier on the image files" in out and "not Inception" in out
    assert "FID reference: 40 real images, half of the 80-image test split" in out
    rows = table(out)
    assert set(rows) == {"0.00", "1.50", "real"}
    json_rows, result = json_table(tmp_path / "m.json")
    assert result["what"] == out.splitlines()[0]
    assert "FID reference: 40 real images" in result["what"]
    assert [row["w"] for row in result["rows"]] == [0.0, 1.5] and set(json_rows) == set(rows)

    test_x, test_y = data.load_dataset("cifar10", str(tmp_path / "cifar"), train=False)
    floor = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:30]  # the floor's draw
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))  # IS's order of rows
    with torch.no_grad():
        ref = clf.features(test_x[0::2].float() / 127.5 - 1).double().numpy()
        for key, x, y in (("0.00", images[:30], labels[:30]), ("1.50", images[30:], labels[30:]),
                          ("real", test_x[1::2][floor], test_y[1::2][floor])):
            x = x.float() / 127.5 - 1
            feats = clf.features(x).double().numpy()
            probs = torch.softmax(clf(x), 1).double().numpy()
            expected_is = inception_score_entropy_form(probs[order], 10)
            expected_acc = (probs.argmax(1) == y.numpy()).mean()
            for figures, rounding in ((rows[key], 1e-4), (json_rows[key], 1e-6)):  # printed: 4 dp
                n, fid, is_mean, is_std, acc = figures
                assert n == 30, key
                assert fid == pytest.approx(fid_scipy(feats, ref), rel=1e-3, abs=rounding), key
                assert (is_mean, is_std) == pytest.approx(expected_is, abs=rounding), key
                assert acc == pytest.approx(expected_acc, abs=rounding), key
            assert isinstance(json_rows[key][0], int), key


# ---------------------------------------------------------------- files and bad inputs

def old_mnist_file(path):
    """A classifier file as metrics.py wrote it before it held more than one architecture: no
    "arch" key."""
    torch.manual_seed(1)
    clf = metric_nets.Classifier()
    config = dict(in_channels=1, image_size=28, num_classes=10, feature_dim=128)
    torch.save(dict(model=clf.state_dict(), config=config, dataset="mnist", test_accuracy=0.98,
                    test_split="the 10000-image test split"), path)
    return clf.eval()


def test_an_old_mnist_classifier_file_still_loads(tmp_path):
    original = old_mnist_file(tmp_path / "mnist.pt")
    loaded = metric_nets.load_classifier(str(tmp_path / "mnist.pt"), dataset="mnist")
    assert type(loaded) is metric_nets.Classifier
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(metrics.classifier_probs(loaded, x), metrics.classifier_probs(original, x))


@pytest.mark.parametrize("case", ["missing npz", "wrong image shape", "mnist classifier",
                                  "unknown architecture", "no classifier", "unwritable json"])
def test_bad_inputs_are_one_line_and_exit_code_2(tmp_path, capsys, case):
    write_cifar_folder(tmp_path / "cifar", per_class=(1, 2), seed=4)
    for train in (True, False):  # decoded and cached now: the decoding's notes are not on stderr
        data.load_dataset("cifar10", str(tmp_path / "cifar"), train=train)
    capsys.readouterr()
    clf_path, npz, result = tmp_path / "clf.pt", tmp_path / "s.npz", tmp_path / "m.json"
    clf = metric_nets.CifarClassifier(widths=(4, 4, 4, 4))
    metric_nets.save_classifier(clf, str(clf_path), dataset="cifar10")
    images, labels = colour_toy(10, seed=5)
    write_npz(npz, images, labels, np.zeros(10))
    expected = {"missing npz": "no samples at", "wrong image shape": "1×28×28",
                "mnist classifier": "not cifar10",
                "unknown architecture": "is not a classifier written by",
                "no classifier": "no classifier at", "unwritable json": "cannot write --json"}[case]
    if case == "missing npz":
        npz = tmp_path / "missing.npz"
    elif case == "wrong image shape":
        write_npz(npz, torch.zeros(10, 1, 28, 28, dtype=torch.uint8), labels, np.zeros(10))
    elif case == "mnist classifier":
        old_mnist_file(clf_path)
    elif case == "unknown architecture":
        saved = torch.load(clf_path, weights_only=True)
        torch.save(dict(saved, arch="VisionTransformer"), clf_path)
    elif case == "no classifier":
        clf_path = tmp_path / "none.pt"
    else:
        result = tmp_path / "no such folder" / "m.json"
    err = fails(["cifar10", "--npz", str(npz), "--data-dir", str(tmp_path / "cifar"),
                 "--classifier", str(clf_path), "--json", str(result)], capsys)
    assert len(err.strip().splitlines()) == 1 and err.startswith("metrics.py: "), err
    assert expected in err, err
    if case == "no classifier":
        assert "train-classifier --dataset cifar10" in err
    assert not result.exists()  # no result where there is none


def test_mnist_command_with_an_old_classifier_file(tmp_path, capsys):
    rng = np.random.default_rng(6)
    folder = tmp_path / "mnist"
    folder.mkdir()
    train_y = np.repeat(np.arange(10, dtype=np.uint8), 5)  # 5 per class: 2 held out, 20 in all
    train_x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(idx_gz(train_x))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(idx_gz(train_y))
    old_mnist_file(tmp_path / "mnist.pt")
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    write_npz(tmp_path / "s.npz", images, torch.arange(20) % 10, np.repeat([0.0, 0.3], 10))
    assert metrics.main(["mnist", "--npz", str(tmp_path / "s.npz"), "--data-dir", str(folder),
                         "--holdout", "2", "--classifier", str(tmp_path / "mnist.pt"),
                         "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "mnist metrics by the project's classifier, not Inception" in out
    assert ("FID reference: 10 real images, half of the last 2 training images of each class "
            "(20), held out") in out
    rows = table(out)
    assert set(rows) == {"0.00", "0.30", "real"} and rows["real"][0] == 10
    assert all(np.isfinite(v).all() for v in rows.values())
    json_rows, result = json_table(tmp_path / "m.json")
    assert result["what"] == out.splitlines()[0]
    assert [row["w"] for row in result["rows"]] == [0.0, 0.3]  # not float32's 0.30000001
    assert set(json_rows) == set(rows)
    for key, row in rows.items():  # the table, to the 4 decimals it prints
        assert json_rows[key] == pytest.approx(row, abs=5e-5), key


def test_inception_path_is_labelled_inception(tmp_path, monkeypatch, capsys):
    """--inception hands the samples of each w to torch-fidelity (a stand-in here) and says so."""
    calls = []

    def calculate_metrics(input1, **kwargs):
        calls.append((len(input1), kwargs["input2"]))
        return {"frechet_inception_distance": 12.5, "inception_score_mean": 7.25,
                "inception_score_std": 0.5}
    fidelity = types.SimpleNamespace(calculate_metrics=calculate_metrics)
    monkeypatch.setitem(sys.modules, "torch_fidelity", fidelity)
    images, labels = colour_toy(30, seed=7)
    write_npz(tmp_path / "s.npz", images, labels, np.repeat([0.0, 2.0], 15))
    assert metrics.main(["cifar10", "--npz", str(tmp_path / "s.npz"), "--inception",
                         "--device", "cpu", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Inception-v3 FID") and "project's classifier" not in out
    assert calls == [(15, "cifar10-train")] * 2
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows == {w: ["15", "12.5000", "7.2500", "0.5000", "-"] for w in ("0.00", "2.00")}
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["what"] == out.splitlines()[0] and result["real"] is None
    assert result["rows"] == [dict(w=w, n=15, fid=12.5, is_std=0.5, accuracy=None, **{"is": 7.25})
                              for w in (0.0, 2.0)]

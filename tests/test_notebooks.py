"""Execute every notebook in quick mode (CFG_QUICK=1: small settings, seconds each), so a change
to a .py file that breaks a notebook fails the test suite. The committed notebooks keep the
outputs of their real runs; this executes copies in memory and writes nothing.

Notebooks 02, 04 and 05 train on mnist-4k (4,000 real MNIST digits). They read it from the folder
named by CFG_DATA_DIR, else from ../shared/data/mnist-4k beside the checkout, where CI keeps it; with
neither, their tests are skipped and say so. `python scripts/make_mnist_subset.py --out DIR` makes a
comparable folder from the official MNIST download; `CFG_DATA_DIR=DIR python -m pytest ...` then runs them.

The committed notebooks must show what they draw: every code cell that makes a figure (plt.subplots,
plt.figure, plt.show, display(Image(...))) has an image among its saved outputs. Execute a notebook for
commit with the inline backend (`jupyter nbconvert --to notebook --execute --inplace`, MPLBACKEND unset): the
Agg backend draws figures without keeping them."""
import glob
import json
import os
import re

import pytest
from conftest import shared_data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
# Notebooks that cannot run without mnist-4k. Notebook 02 also uses Fashion-MNIST where it finds it
# (CFG_FASHION_DIR or ../shared/data/fashion-mnist) and leaves it out in quick mode where it does not;
# notebook 06 uses it outside quick mode only.
NEEDS_MNIST_4K = {"02_mnist_tradeoff.ipynb", "04_classifier_guidance.ipynb", "05_guidance_family.ipynb",
                  "06_guidance_free.ipynb"}
# Notebooks that read ../shared/data outside quick mode only: in quick mode they write small image files of
# their own (notebook 03: a synthetic CIFAR-10 image folder), so they run in a fresh clone.
OWN_QUICK_DATA = {"03_cifar10_tradeoff.ipynb"}

DRAWS = re.compile(r"plt\.subplots\(|plt\.figure\(|plt\.show\(|display\(Image\(")


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        return "\n".join("".join(cell["source"]) for cell in json.load(f)["cells"] if cell["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    if os.path.basename(path) in NEEDS_MNIST_4K:
        data_dir = os.environ.get("CFG_DATA_DIR") or shared_data(
            "mnist-4k", hint="make a comparable folder with scripts/make_mnist_subset.py and set CFG_DATA_DIR to it")
        monkeypatch.setenv("CFG_DATA_DIR", os.path.abspath(data_dir))  # the kernel runs in notebooks/
    monkeypatch.setenv("CFG_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()


def test_every_notebook_that_reads_shared_data_is_skipped_without_it():
    """A notebook whose code reads ../shared/data must be listed above, or a fresh clone fails instead of skipping."""
    readers = {os.path.basename(p) for p in NOTEBOOKS if "shared/data" in code_cells(p)}
    assert readers, "no notebook reads ../shared/data: the check below would pass on anything"
    unguarded = readers - NEEDS_MNIST_4K - OWN_QUICK_DATA
    assert not unguarded, f"read ../shared/data but are not skipped without it: {unguarded}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_figure_a_notebook_draws_is_in_its_committed_outputs(path):
    with open(path, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    drawing = [i for i, c in enumerate(cells) if DRAWS.search("".join(c["source"]))]
    assert drawing, "no cell draws a figure: the check would pass on anything"
    bare = [i for i in drawing if not any("image/png" in out.get("data", {}) for out in cells[i].get("outputs", []))]
    assert not bare, f"code cells {bare} (counted among code cells) draw a figure but their saved outputs hold none"

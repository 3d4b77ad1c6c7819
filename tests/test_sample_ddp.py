"""sample.py under torchrun: two CPU processes (gloo) write exactly the npz that one process writes.

Each image's noise comes from its own generator seeded by (seed, class, index), and the images are
split across the ranks by index, so the number of processes must not change a single pixel. The
reference is the plain single-process `python sample.py` with the same arguments; the test also
checks that rank 0 alone wrote the outputs (one npz, one grid, no temporary files).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_sample_ddp.py
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
from presets import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses on the shared machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A digits checkpoint, random weights in the zero-initialised layers too (else ε ≡ 0)."""
    torch.manual_seed(0)
    net = M.UNet(PRESETS["digits"].network)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    state = net.state_dict()
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    M.save_checkpoint({"model": state, "ema": state, "optimizer": {}, "step": 0,
                       "config": dataclasses.asdict(net.config),
                       "args": {"dataset": "digits"}}, path)
    return path


# --batch-size 1: every image is then computed in a batch of its own in both runs. With larger
# batches the two runs group the images differently, and a convolution over another batch may
# round differently (one uint8 level, see test_sample.py); the index sharding itself is exact.
@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp2m"])
def test_two_processes_write_the_single_process_npz(ckpt, tmp_path, sampler):
    args = ["--ckpt", ckpt, "--w", "0", "2", "--classes", "1,4,7", "--n-per-class", "3",
            "--steps", "3", "--sampler", sampler, "--seed", "5", "--batch-size", "1",
            "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    runs = {}
    for name, launcher in (("ddp", torchrun), ("single", [sys.executable])):
        folder = tmp_path / name
        folder.mkdir()
        outputs = ["--out", str(folder / "grid.png"), "--npz", str(folder / "samples.npz"),
                   "--json", str(tmp_path / f"{name}.json")]
        proc = subprocess.run([*launcher, "sample.py", *args, *outputs], cwd=REPO,
                              capture_output=True, text=True, env=ONE_THREAD, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # Only rank 0 writes: one grid, one npz, no temporary files left by either rank.
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "samples.npz"]
        result = json.loads((tmp_path / f"{name}.json").read_text())
        runs[name] = result, np.load(folder / "samples.npz")

    (ddp_out, ddp), (single_out, single) = runs["ddp"], runs["single"]
    assert (ddp_out["images"], ddp_out["processes"]) == (18, 2), ddp_out
    assert (single_out["images"], single_out["processes"]) == (18, 1), single_out
    assert sorted(ddp.files) == sorted(single.files) == ["images", "labels", "w"]
    for key in ("images", "labels", "w"):
        assert ddp[key].dtype == single[key].dtype and ddp[key].shape == single[key].shape
        np.testing.assert_array_equal(ddp[key], single[key])
    # The grid order (w, class, index), and images not all alike: equality means something.
    assert single["labels"].tolist() == [1, 1, 1, 4, 4, 4, 7, 7, 7] * 2
    assert single["w"].tolist() == [0.0] * 9 + [2.0] * 9
    images = single["images"].astype(int)
    assert images.shape == (18, 8, 8, 1) and len({im.tobytes() for im in single["images"]}) == 18
    assert np.abs(images[:9] - images[9:]).max() > 0  # guidance changed the images

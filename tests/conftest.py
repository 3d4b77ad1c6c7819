"""Make the flat top-level modules (schedule, model, data, train, sample, metrics) importable from tests,
and the fixtures several test files share."""
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
    """main(argv) exits with code 2 and one line on stderr that starts with `prefix`; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(prefix) and "Traceback" not in err, err
    return err

"""The plumbing of the project's commands, in one place: one-line errors, typed numbers, the device,
atomic file writes and JSON results.

    fail = functools.partial(cli.fail, prog="train.py")   # fail("...") -> one line, exit code 2
    p = cli.parser("train.py", __doc__)                   # argparse whose errors go through fail
    p.add_argument("--lr", type=cli.number(float, 0, low_inclusive=False))
    device = cli.device("cuda:0", fail)                   # a torch.device this machine has
    cli.write_json(path, {"fid": 3.4})                    # whole or absent, never half a file

The lift-out files (schedule.py, model.py, guidance.py, sample.py) do not import it, so they can
be copied into another project alone.
"""
import argparse
import json
import math
import os
import sys
import tempfile

import torch


def fail(message, prog):
    """Bad input: one line on stderr (from rank 0 of a torchrun only), exit code 2, no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parser(prog, doc, **kwargs):
    """An ArgumentParser described by `doc`'s first line; errors are one line, exit code 2."""
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0], **kwargs)
    p.error = lambda message: fail(f"{message} (see python {prog} --help)", prog)
    return p


def number(kind, low, high=math.inf, low_inclusive=True, high_inclusive=False):
    """An argparse type: a finite `kind` (int or float) in the range, else a one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if math.isfinite(value) and above and below:
            return value
        if high < math.inf:
            left, right = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
            bounds = f"{left}{low:g}, {high:g}{right}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        positive = (low, low_inclusive) in ((0, False), (1, True))
        need = "positive" if positive else f"{low:g} or more"
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return parse


def device(name, fail):
    """The torch.device `name` (cpu, cuda, cuda:N), if this machine has it; else fail(one line)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available: use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over `path`:
    a crash at any moment leaves the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, result):
    """A command's result as JSON (`--json PATH`), written atomically."""
    atomic_write(path, lambda f: json.dump(result, f, indent=1), mode="w")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

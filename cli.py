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
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
import sys
import tempfile

import torch
import torch.distributed as dist


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


def distributed(name, fail):
    """(device, rank, world_size): one process, or under torchrun (RANK and WORLD_SIZE set) a rank
    of a process group on its own GPU (NCCL) or on the CPU (gloo)."""
    dev = device(name, fail)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return dev, 0, 1
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def any_rank(flag, device):
    """True on every rank if `flag` is True on any rank (one all-reduce)."""
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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


def sha256(path):
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, result):
    """A command's result as JSON (`--json PATH`), written atomically."""
    atomic_write(path, lambda f: json.dump(result, f, indent=1), mode="w")


def lock_out_dir(out_dir, lock_file, prog):
    """Hold out_dir for this process's life: (the open lock file, None), or (None, an error line).

    An exclusive flock on out_dir/lock_file, which holds this process's PID for the message another
    run gets. The OS releases it however the process ends (kill -9 too), so it is never stale; a
    run that finishes removes the file (release_out_dir). A lock taken on a file that was removed
    meanwhile is taken again on the new one, so two runs never hold two different files."""
    path = os.path.join(out_dir, lock_file)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # checkpoints are written, then renamed
        lock = open(path, "a+")  # "a+": opening keeps the PID written by the holder
    except OSError as e:
        return None, f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable folder"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.exists(path) or not os.path.samestat(os.fstat(lock.fileno()),
                                                            os.stat(path)):
            lock.close()  # its holder removed it as it finished: lock the file there now
            return lock_out_dir(out_dir, lock_file, prog)
    except OSError as e:
        lock.seek(0)
        holder = lock.read().strip()  # empty only while the holder is between flock and write
        lock.close()
        if isinstance(e, BlockingIOError):
            who = (f"another {prog} (process {holder})" if holder
                   else f"another {prog} that is starting")
            return None, (f"--out-dir {out_dir} is in use by {who}: wait for it to end or stop "
                          "it, or choose another --out-dir")
        return None, f"cannot lock {path} ({e.strerror}): choose an --out-dir on a local disk"
    lock.truncate(0)
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock, None


def release_out_dir(lock):
    """The end of a finished run: remove the lock file, then let go of it."""
    os.remove(lock.name)
    lock.close()


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after this step and save; a second Ctrl-C stops now."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

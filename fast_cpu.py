"""A CPU speed setting for sampling: it changes how fast results come, never the results.

sample.py's command line opts in with one line, `fast_cpu.keep_freed_memory()`;
bench.py times with and without it (`--plain`). Leave it out when you copy
model.py and sample.py into your own project: they work the same without it.

What it does: glibc's malloc is told, for the whole process, to keep the memory
it frees for reuse (never mmap, never trim). By default an allocation above a
threshold (up to 32 MiB) is mmap'ed and given back when freed, so each sampling
step's large activations (twice as large when the guided step runs as one batch
of 2B) arrive as fresh pages, zeroed on first touch: the step then spends much
of its time in page faults. The price: the process keeps its peak memory until
it exits. On other C libraries it does nothing.

The figures, and the settings tried and not kept (channels_last, a custom
dropout): docs/results.md, "Performance".
"""
import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from <malloc.h>


def keep_freed_memory():
    """glibc malloc: serve every allocation from the heap, never give freed memory back.

    Returns True if the setting was made, False if the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return True

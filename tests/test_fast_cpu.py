"""fast_cpu.py: the malloc setting, by its effect on page faults in a fresh process
(the setting is process-wide): freed 64 MiB tensors' pages are reused only with it."""
import os
import platform
import subprocess
import sys

import pytest

import fast_cpu

SCRIPT = """import resource, sys, torch, fast_cpu
if sys.argv[1] == 'on': assert fast_cpu.keep_freed_memory()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30): torch.ones(2 ** 24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="fast_cpu sets glibc's malloc; this C library is not glibc")
def test_keep_freed_memory_stops_page_faults():
    here = os.path.dirname(os.path.abspath(fast_cpu.__file__))
    faults = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=here,
                              capture_output=True, text=True, check=True)
        faults[mode] = int(proc.stdout)
    pages = 30 * 2 ** 26 // 4096  # thirty 64 MiB tensors of 4 KiB pages
    assert faults["off"] > pages // 2 and faults["on"] < pages // 3, faults

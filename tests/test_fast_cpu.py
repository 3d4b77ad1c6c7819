"""fast_cpu.py: the malloc setting, by its effect on page faults in a fresh process (the setting is
process-wide): freed 64 MiB tensors' pages are reused only with it."""
import os
import subprocess
import sys

import fast_cpu


def test_keep_freed_memory_stops_page_faults():
    script = ("import resource, sys, torch, fast_cpu\n"
              "if sys.argv[1] == 'on': assert fast_cpu.keep_freed_memory()\n"
              "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(30): torch.ones(2 ** 24)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)\n")
    here = os.path.dirname(os.path.abspath(fast_cpu.__file__))
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], cwd=here, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("off", "on")}
    pages = 30 * 2 ** 26 // 4096  # thirty 64 MiB tensors of 4 KiB pages
    assert faults["off"] > pages // 2 and faults["on"] < pages // 3, faults

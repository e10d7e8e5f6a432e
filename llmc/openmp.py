"""How llmc's OpenMP threads wait between parallel regions, set before torch loads its OpenMP runtime.

libgomp (the OpenMP runtime of torch's Linux wheels) reads its wait policy once, when it is loaded, so this must
run before the first `import torch` of the process: `llmc/__init__.py` calls it, and every llmc entry point
imports llmc first. Where torch is already loaded, or the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT, it changes
nothing.

Why a bounded spin. A decode step is hundreds of short parallel regions back to back (a GEMV of a small model takes
20-100 us). libgomp's default keeps idle threads spinning for a long time, which is fastest on an idle machine
and collapses on a busy one: on 2 shared cores, a SmolLM2-135M decode step went from 66 ms to 260 ms while another
process ran, because each region waits for a thread whose core the other process holds. OMP_WAIT_POLICY=PASSIVE
(threads sleep at once) survives the busy host but pays a futex wake-up per region on an idle one (a 1728 x 576
GEMV: 86 us against 30 us). A spin of SPIN_COUNT iterations keeps threads awake across the gaps inside a step
(a few us of Python between ops) and lets them sleep between steps and when the cores are taken
(bench/results/<device>/openmp.md has the figures behind the value).
"""
from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def set_wait_policy() -> bool:
    """Sets GOMP_SPINCOUNT for this process where it can still take effect; whether it did."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True

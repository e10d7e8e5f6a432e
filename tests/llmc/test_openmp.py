"""llmc's OpenMP wait policy: set on import where it can still take effect, never over the user's own."""
import os
import subprocess
import sys

import pytest

from llmc.openmp import SPIN_COUNT

PRINT = "import os; {first}; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def spin_count_after(first: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PRINT.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_llmc_first_bounds_the_spin():
    assert spin_count_after("import llmc") == [SPIN_COUNT, "None"]


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "7"}])
def test_the_users_policy_stands(env):
    want = [env.get("GOMP_SPINCOUNT", "None"), env.get("OMP_WAIT_POLICY", "None")]
    assert spin_count_after("import llmc", **env) == want


def test_too_late_once_torch_is_loaded():
    assert spin_count_after("import torch; import llmc") == ["None", "None"]

"""Groups of Triton checks run in a fresh subprocess under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels, and other tests may import
the kernel modules first without it, so a test file runs each group by re-running itself as a
script in a subprocess, whose ``__main__`` calls :func:`group_main`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_group(test_file: str, group: str, timeout: int = 600, **extra_env: str) -> None:
    """Run ``python test_file group`` with the interpreter on; assert it reported ALL OK."""
    env = dict(os.environ, TRITON_INTERPRET="1", **extra_env,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MATMAMBA_IMPL", None)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), group], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"group {group} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "ALL OK" in proc.stdout, proc.stdout[-4000:]


def group_main(groups: dict[str, Callable[[list], None]], group: str) -> int:
    """Subprocess side: run one group (each appends what failed to the list), print the verdict."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test (sets TRITON_INTERPRET=1)"
    import torch

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from gpu_check import poisoned_allocations  # NaN in every torch.empty, as on the GPU

    torch.manual_seed(0)
    torch.set_num_threads(2)
    failures: list = []
    with poisoned_allocations():
        groups[group](failures)
    if failures:
        print("FAILED:", failures)
        return 1
    print("ALL OK")
    return 0


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual holds NaN or inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(actual.isfinite().all()):
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()

"""Importing the published ``mamba_ssm`` kernels, the baselines of the GPU scripts.

A ``mamba_ssm`` wheel built without its CUDA extensions (``MAMBA_SKIP_CUDA_BUILD``, how
scripts/gpu_visit.sh builds it) still has the whole Mamba2 Triton path, but the package's
``__init__`` imports Mamba-1's CUDA scan (``selective_scan_cuda``) and Mamba-3 and fails.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def expose_mamba_ssm_package() -> None:
    """Make ``import mamba_ssm.<submodule>`` work without running the package's ``__init__``:
    an empty ``selective_scan_cuda`` and a bare package module over the installed folder.
    Idempotent (the bare package has no ``__spec__``, so ``find_spec`` is asked only once).
    Raises ImportError when mamba_ssm is not installed."""
    if "mamba_ssm" in sys.modules:
        return
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        raise ImportError("mamba_ssm is not installed")
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package

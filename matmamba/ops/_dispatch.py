"""Choosing which implementation of an op runs.

Every op in ``matmamba.ops`` exists in up to three forms, selected by the ``impl`` argument of
the public function:

- ``"naive"``:  the plain sequential reference in ``matmamba/ops/<op>/naive.py``. Slow, exact
  (float64-capable), the oracle of the tests.
- ``"torch"``:  the PyTorch implementation (``chunked.py`` for the scan, ``torch_impl.py`` for the
  others). Runs on any device, differentiable through autograd. The CPU default.
- ``"triton"``: the Triton kernels in ``matmamba/ops/<op>/triton_impl.py`` (CUDA, hand-written
  backward).
- ``"auto"``:   the default. Resolves, in this order, to
    1. the override set by the :func:`use_impl` context manager, if one is active;
    2. the environment variable ``MATMAMBA_IMPL``, if set (to anything but ``"auto"``);
    3. ``"triton"`` when every tensor argument is on CUDA and the op's Triton module imports;
    4. ``"torch"`` otherwise.
  An override or environment value of ``"triton"`` forces Triton exactly like ``impl="triton"``.

Triton modules are imported lazily, on the first call with CUDA tensors, through
``importlib.import_module("matmamba.ops.<op>.triton_impl")``. When ``"auto"`` resolves towards
Triton and that import fails (``ImportError``, e.g. the module or Triton itself is missing), the
op falls back to the torch implementation; when Triton was asked for explicitly, the failure is
raised as a ``RuntimeError`` naming the module and the cause.

Contract for a Triton module: it exports a function with the same signature as the torch
implementation minus ``impl``, named

- ``matmamba/ops/ssd/triton_impl.py``:          ``ssd_scan_triton``
  (torch implementation: ``matmamba.ops.ssd.chunked.ssd_scan_chunked``)
- ``matmamba/ops/conv1d/triton_impl.py``:       ``causal_conv1d_triton`` and
  ``causal_conv1d_update_triton`` (torch: ``matmamba.ops.conv1d.torch_impl.causal_conv1d_torch``,
  ``causal_conv1d_update_torch``)
- ``matmamba/ops/rmsnorm/triton_impl.py``:      ``gated_rmsnorm_triton``
  (torch: ``matmamba.ops.rmsnorm.torch_impl.gated_rmsnorm_torch``)
- ``matmamba/ops/state_update/triton_impl.py``: ``ssd_state_update_triton``
  (torch: ``matmamba.ops.state_update.torch_impl.ssd_state_update_torch``)
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch

VALID_IMPLS = ("auto", "naive", "torch", "triton")
ENV_VAR = "MATMAMBA_IMPL"

# The active use_impl() override; a ContextVar so threads and asyncio tasks do not leak it.
_impl_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "matmamba_impl_override", default=None
)


def check_impl(impl: str, *, source: str = "impl") -> str:
    """Return ``impl`` if it is one of :data:`VALID_IMPLS`, else raise a ValueError naming them."""
    if impl not in VALID_IMPLS:
        raise ValueError(
            f"{source} must be one of {', '.join(repr(v) for v in VALID_IMPLS)}; got {impl!r}"
        )
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Within the ``with`` block, every op called with ``impl="auto"`` uses ``impl``.

    ``use_impl("auto")`` cancels an outer override (and ignores ``MATMAMBA_IMPL``). Nested blocks
    restore the outer setting on exit.
    """
    token = _impl_override.set(check_impl(impl, source="use_impl(impl)"))
    try:
        yield
    finally:
        _impl_override.reset(token)


def get_default_impl() -> str:
    """What ``impl="auto"`` means right now: the use_impl() override, else the MATMAMBA_IMPL
    environment variable, else ``"auto"`` (triton on CUDA when available, torch otherwise)."""
    override = _impl_override.get()
    if override is not None:
        return override
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return check_impl(from_env, source=f"environment variable {ENV_VAR}")
    return "auto"


def triton_module_name(op: str) -> str:
    return f"matmamba.ops.{op}.triton_impl"


def _import_triton_module(op: str):
    """The op's Triton module, or the ImportError that importing it raised."""
    try:
        return importlib.import_module(triton_module_name(op))
    except ImportError as error:  # ModuleNotFoundError is a subclass
        return error


def _all_on_cuda(tensors: Iterable[torch.Tensor | None]) -> bool:
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present)


def resolve_impl(op: str, impl: str, tensors: Iterable[torch.Tensor | None]) -> str:
    """Turn a requested ``impl`` into the concrete one: ``"naive"``, ``"torch"`` or ``"triton"``.

    ``op`` is the op's folder name under ``matmamba/ops`` (``"ssd"``, ``"conv1d"``, ...);
    ``tensors`` are the call's tensor arguments (None entries are ignored).
    """
    check_impl(impl)
    if impl == "auto":
        impl = get_default_impl()
    if impl != "auto":
        return impl
    if _all_on_cuda(tensors) and not isinstance(_import_triton_module(op), ImportError):
        return "triton"
    return "torch"


def triton_function(op: str, function_name: str) -> Callable:
    """Import ``function_name`` from the op's Triton module; a RuntimeError if that fails."""
    module = _import_triton_module(op)
    if isinstance(module, ImportError):
        raise RuntimeError(
            f"impl='triton' was requested, but {triton_module_name(op)} could not be imported "
            f"({type(module).__name__}: {module}). Use impl='torch' (or 'auto') instead."
        ) from module
    try:
        return getattr(module, function_name)
    except AttributeError:
        raise RuntimeError(
            f"impl='triton' was requested, but {triton_module_name(op)} does not define "
            f"{function_name}()"
        ) from None


def pick_implementation(
    op: str,
    impl: str,
    tensors: Iterable[torch.Tensor | None],
    *,
    naive: Callable,
    torch_impl: Callable,
    triton_name: str,
) -> Callable:
    """The function that runs one call: ``naive``, ``torch_impl`` or the named Triton function."""
    which = resolve_impl(op, impl, tensors)
    if which == "naive":
        return naive
    if which == "torch":
        return torch_impl
    return triton_function(op, triton_name)

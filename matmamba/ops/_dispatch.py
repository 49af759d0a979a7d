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

Under ``torch.compile`` the choice is made while tracing: a change of the :func:`use_impl`
override is guarded (it recompiles); ``MATMAMBA_IMPL`` (like ``MATMAMBA_SSD_CHUNK``) is read once
per trace. (Dynamo traces ``ContextVar.get`` only from torch 2.13 on, so compiled code reads a
thread-local mirror of the override that :func:`use_impl` keeps, and it imports the Triton modules
with import statements: ``importlib`` is not traced.) The Triton ops are ``torch.library`` custom
ops (namespace ``matmamba``), so a compiled model keeps them in its graph without breaks.

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
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

VALID_IMPLS = ("auto", "naive", "torch", "triton")
ENV_VAR = "MATMAMBA_IMPL"

# The active use_impl() override; a ContextVar so threads and asyncio tasks do not leak it.
_impl_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "matmamba_impl_override", default=None
)
# The same value per thread, read by code that torch.compile traces (Dynamo guards on it in every
# torch version we support; ContextVar.get() is a graph break before torch 2.13).
_compiled_view = threading.local()
_compiled_view.override = None  # (other threads start without the attribute: getattr default)


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
    outer = getattr(_compiled_view, "override", None)
    _compiled_view.override = impl
    try:
        yield
    finally:
        _impl_override.reset(token)
        _compiled_view.override = outer


def get_default_impl() -> str:
    """What ``impl="auto"`` means right now: the use_impl() override, else the MATMAMBA_IMPL
    environment variable, else ``"auto"`` (triton on CUDA when available, torch otherwise)."""
    if torch.compiler.is_compiling():
        override = getattr(_compiled_view, "override", None)
    else:
        override = _impl_override.get()
    if override is not None:
        return override
    from_env = _impl_from_env()
    if from_env:
        return check_impl(from_env, source=f"environment variable {ENV_VAR}")
    return "auto"


@torch.compiler.assume_constant_result
def _impl_from_env() -> str:
    """MATMAMBA_IMPL, read on every eager call; under torch.compile, once per trace."""
    return os.environ.get(ENV_VAR, "").strip()


# Inference paths beyond the ops: outside autograd on CUDA, the block's decode step runs a fused
# core (conv update -> state update -> gated norm on the in_proj output, 3 launches) and the
# models' residual-stream RMSNorm a Triton kernel, where the ops composed launch several times as
# many kernels (decoding at small batch is bound by launches). On by default; use_fused_inference
# (False) or MATMAMBA_FUSED_INFERENCE=0 runs the composed ops instead (same results up to rounding).
FUSED_INFERENCE_ENV_VAR = "MATMAMBA_FUSED_INFERENCE"
_fused_inference_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "matmamba_fused_inference_override", default=None
)


@contextlib.contextmanager
def use_fused_inference(enabled: bool) -> Iterator[None]:
    """Within the ``with`` block, inference (outside autograd, on CUDA) takes the fused decode
    core and the residual norm's kernel if ``enabled``, else the public ops composed."""
    token = _fused_inference_override.set(bool(enabled))
    try:
        yield
    finally:
        _fused_inference_override.reset(token)


def fused_inference_enabled() -> bool:
    """The use_fused_inference() override, else MATMAMBA_FUSED_INFERENCE (default on; "0",
    "false", "no" or "off" turn it off). Eager only: compiled code never asks."""
    override = _fused_inference_override.get()
    if override is not None:
        return override
    return os.environ.get(FUSED_INFERENCE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def fused_inference_applies(op: str, inputs: Iterable[torch.Tensor],
                            parameters: Iterable[torch.Tensor] = ()) -> bool:
    """Whether a fused inference path runs for this call: eagerly (under torch.compile the ops are
    traced and inductor fuses them), turned on (``fused_inference_enabled``), outside autograd
    (the paths have no backward: a call that autograd would record, through ``inputs`` or
    ``parameters``, takes the ops; ``parameters`` is only read while grad mode is on) and where
    ``op`` resolves to Triton for ``inputs``."""
    if torch.compiler.is_compiling() or not fused_inference_enabled():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *parameters)):
        return False
    return resolve_impl(op, "auto", inputs) == "triton"


def triton_module_name(op: str) -> str:
    return f"matmamba.ops.{op}.triton_impl"


def _import_triton_module(op: str):
    """The op's Triton module, or the ImportError that importing it raised."""
    if torch.compiler.is_compiling():
        return _triton_module_while_compiling(op)
    return _import_module(triton_module_name(op))


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:  # ModuleNotFoundError is a subclass
        return error


@torch.compiler.assume_constant_result
def _triton_module_imports(op: str) -> bool:
    """Whether the op's Triton module imports (Dynamo runs this once per trace, as a constant)."""
    return not isinstance(_import_module(triton_module_name(op)), ImportError)


def _triton_module_while_compiling(op: str):
    """The op's Triton module under torch.compile: Dynamo does not trace importlib.import_module
    (a graph break), but it does trace import statements."""
    if not _triton_module_imports(op):
        return ImportError(f"{triton_module_name(op)} could not be imported")
    if op == "ssd":
        from .ssd import triton_impl
    elif op == "conv1d":
        from .conv1d import triton_impl
    elif op == "rmsnorm":
        from .rmsnorm import triton_impl
    elif op == "state_update":
        from .state_update import triton_impl
    else:
        raise ValueError(f"unknown op {op!r}")
    return triton_impl


def _all_on_cuda(tensors: Iterable[torch.Tensor | None]) -> bool:
    present = [t for t in tensors if t is not None]
    # len() rather than bool(list): Dynamo in torch 2.11 cannot trace bool() of a list (graph break)
    return len(present) > 0 and all(t.is_cuda for t in present)


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

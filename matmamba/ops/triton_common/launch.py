"""Launch a Triton kernel with less host work: ``launch(kernel, grid, *args, **constexprs)``.

``kernel[grid](*args, **kw)`` spends its host time in Triton's Python before the compiled kernel's
own launcher runs: binding the arguments, specializing each one, turning the options into a
string key, looking that up. On an H200 host that was 22.7 us for an 18-argument kernel against
5.2 us for the compiled kernel's launcher (scripts/host_profile.py, session 8), and the scan's
heavy kernels take 56-66 arguments. Eagerly (and under torch.compile, where our ops stay opaque
calls) a block's forward + backward makes about 16 such launches.

``launch`` keeps, per kernel, the compiled kernel Triton chose for each distinct call, keyed on
everything Triton specializes on, and launches that directly through the compiled kernel's
launcher (what ``CompiledKernel[grid](...)`` does, without building launch metadata when no
launch hook is registered):

* tensors: dtype and whether ``data_ptr()`` is 16-byte aligned (Triton's pointer attribute);
* every other argument by type and exact value: ints decide Triton's ``== 1`` constant, its
  divisible-by-16 attribute and its i32 / i64 type, so the exact value is a superset of those;
* the keyword arguments (constexprs and launch options, in the order given) and the device.

Measured on an H200 host (Triton 3.6, session 12): 18.8 us a launch through Triton, 12.6 us a
hit, 6.1 us the launcher alone; the scan's eager forward + backward 1.81 -> 1.18 ms of host time.

A miss runs the ordinary ``kernel[grid](...)``, which compiles or finds the kernel in Triton's
own cache, and remembers the result; results are identical either way (the same compiled code is
launched with the same arguments). The fast path needs every parameter after the positional
ones to be given as a keyword (true of every kernel here); otherwise, under the interpreter
(``TRITON_INTERPRET=1``), for kernels with pre-run hooks, or with ``MATMAMBA_TRITON_LAUNCH_CACHE=0``
in the environment, every call takes the ordinary path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4: hooks live elsewhere; hits take CompiledKernel[grid]
    _knobs = None

ENABLED = os.environ.get("MATMAMBA_TRITON_LAUNCH_CACHE", "1").strip() not in ("0", "false", "no")

# Entries per kernel before its table is emptied (a new length or batch is a new entry: strides
# and sizes are part of the key). Refilling costs one ordinary launch per entry.
MAX_ENTRIES = 512


class _KernelLaunches:
    """The compiled kernels one Triton kernel has been launched with, by call signature."""

    __slots__ = ("table", "hits", "misses")

    def __init__(self):
        self.table: dict = {}
        self.hits = 0
        self.misses = 0


_LAUNCHES: dict[object, _KernelLaunches] = {}
_NO_FAST_PATH = object()  # table value: this call signature always takes the ordinary path


def _current_device_and_stream():
    # what Triton's CUDA driver reads (torch's current device and raw stream), without going
    # through its lazily bound driver object
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _hooks_active() -> bool:
    """Whether launch hooks are registered (a profiler such as proton): then every launch takes
    the path that builds Triton's launch metadata and calls them."""
    if _knobs is None:
        return True
    # Triton >= 3.5 keeps each hook as a HookChain (empty ``calls`` when none); older: None
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


def _call_key(device, args: Sequence, kwargs: dict):
    key = [device, tuple(kwargs.items())]
    append = key.append
    for a in args:
        kind = type(a)
        if kind is int:
            append(a)
        elif isinstance(a, torch.Tensor):
            append((a.dtype, a.data_ptr() % 16 == 0))
        else:  # bool, float, None, ...: the type keeps True apart from 1 and 1.0
            append((kind, a))
    return tuple(key)


def _constexpr_tail(kernel, n_positional: int, kwargs: dict):
    """The values of the parameters after the positional ones, in the kernel's order, or None
    when one of them is not among the keywords (it has a default: the fast path is not used)."""
    names = kernel.arg_names[n_positional:]
    if any(name not in kwargs for name in names):
        return None
    return tuple(kwargs[name] for name in names)


def _fast_entry(compiled, tail):
    """What a hit launches with: the compiled kernel's launcher (``CompiledKernel.run``, whose
    handles the ordinary launch just loaded), its function and packed metadata, the constexpr
    tail; the compiled kernel itself for launches with hooks. None: no fast path."""
    if compiled is None or tail is None:
        return None
    run = getattr(compiled, "run", None)
    function = getattr(compiled, "function", None)
    if run is None or function is None or not hasattr(compiled, "packed_metadata"):
        return None
    return run, function, compiled.packed_metadata, tail, compiled


def launch(kernel, grid: Sequence[int], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel when this call's
    specialization has been seen before (module docstring)."""
    if not ENABLED or not hasattr(kernel, "params") or kernel.pre_run_hooks:
        kernel[grid](*args, **kwargs)  # the interpreter's InterpretedFunction has no ``params``
        return
    launches = _LAUNCHES.get(kernel)
    if launches is None:
        launches = _LAUNCHES[kernel] = _KernelLaunches()
    device, stream = _current_device_and_stream()
    try:
        key = _call_key(device, args, kwargs)
        entry = launches.table.get(key)
    except TypeError:  # an unhashable argument: nothing to key on
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        launches.misses += 1
        compiled = kernel[grid](*args, **kwargs)
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return  # a tensor given by keyword would be keyed by identity: never remembered
        if len(launches.table) >= MAX_ENTRIES:
            launches.table.clear()
        entry = _fast_entry(compiled, _constexpr_tail(kernel, len(args), kwargs))
        launches.table[key] = entry if entry is not None else _NO_FAST_PATH
        return
    if entry is _NO_FAST_PATH:
        kernel[grid](*args, **kwargs)
        return
    launches.hits += 1
    run, function, metadata, tail, compiled = entry
    grid_x = grid[0]
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    if _hooks_active():
        compiled[(grid_x, grid_y, grid_z)](*args, *tail, stream=stream)
    else:  # what CompiledKernel[grid] does, less the launch metadata no hook will read
        run(grid_x, grid_y, grid_z, stream, function, metadata, None, None, None, *args, *tail)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code. (``triton.cdiv`` is a constexpr function: each host call
    goes through its argument unwrapping, about a microsecond, and a block step makes ~35.)"""
    return (a + b - 1) // b  # (also on symbolic sizes, as in the ops' fake functions)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for host code (see ``cdiv``); 0 for 0, as Triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch_stats() -> dict[str, dict[str, int]]:
    """Per kernel name: cache hits, misses and entries (for benchmarks and tests)."""
    stats = {}
    for kernel, launches in _LAUNCHES.items():
        name = getattr(kernel, "__name__", None) or repr(kernel)
        stats[name] = dict(hits=launches.hits, misses=launches.misses,
                           entries=len(launches.table))
    return stats


def clear_launch_cache() -> None:
    _LAUNCHES.clear()

"""The launch cache of ``matmamba.ops.triton_common.launch`` (CPU, with a stand-in kernel).

What is checked here is the cache's own logic: which calls reuse a compiled kernel and which go
back through Triton, and what the compiled kernel is launched with. That a reused kernel gives
the same results as Triton's own path on real kernels is checked on the GPU
(``scripts/gpu_check.py --only launch``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from matmamba.ops.triton_common import launch as launch_mod  # noqa: E402


class _Compiled:
    """Stands in for triton's CompiledKernel: its launcher ``run(grid_x, grid_y, grid_z, stream,
    function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``, and
    ``compiled[grid](*args, stream=...)`` (the path taken while launch hooks are registered)."""

    function = "cu_function"
    packed_metadata = "packed"

    def __init__(self, calls):
        self.calls = calls

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, *rest):
        enter_hook, exit_hook, *args = rest
        assert (function, metadata) == ("cu_function", "packed")
        assert launch_metadata is None and enter_hook is None and exit_hook is None
        self.calls.append(("fast", (grid_x, grid_y, grid_z), tuple(args), stream))

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.calls.append(("fast_with_hooks", grid, args, stream))
        return runner


class _Kernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` returns the compiled kernel."""

    def __init__(self, arg_names, returns_compiled=True):
        self.arg_names = list(arg_names)
        self.params = self.arg_names
        self.pre_run_hooks = []
        self.calls = []
        self.compiled = _Compiled(self.calls) if returns_compiled else None
        self.__name__ = "stand_in_kernel"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    launch_mod.clear_launch_cache()
    monkeypatch.setattr(launch_mod, "ENABLED", True)
    monkeypatch.setattr(launch_mod, "_current_device_and_stream", lambda: (0, 1234))
    yield
    launch_mod.clear_launch_cache()


def _paths(kernel):
    return [call[0] for call in kernel.calls]


def test_second_identical_call_launches_the_compiled_kernel_with_constexprs_in_order():
    kernel = _Kernel(["x_ptr", "n", "scale", "BLOCK", "FLAG"])
    x = torch.zeros(64)
    launch_mod.launch(kernel, (4, 2), x, 100, 0.5, FLAG=True, BLOCK=32, num_warps=4)
    launch_mod.launch(kernel, (4, 2), x, 100, 0.5, FLAG=True, BLOCK=32, num_warps=4)
    assert _paths(kernel) == ["triton", "fast"]
    _, grid, args, stream = kernel.calls[1]
    assert grid == (4, 2, 1)                      # padded to three axes
    assert args == (x, 100, 0.5, 32, True)        # the constexprs in the kernel's order, not the call's
    assert stream == 1234
    assert launch_mod.launch_stats()["stand_in_kernel"] == dict(hits=1, misses=1, entries=1)


def test_with_launch_hooks_registered_a_hit_builds_the_launch_through_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(launch_mod, "_hooks_active", lambda: True)
    kernel = _Kernel(["x_ptr", "BLOCK"])
    x = torch.zeros(4)
    for _ in range(2):
        launch_mod.launch(kernel, (3,), x, BLOCK=16)
    assert _paths(kernel) == ["triton", "fast_with_hooks"]
    assert kernel.calls[1][1:] == ((3, 1, 1), (x, 16), 1234)


def test_hooks_are_read_from_triton():
    """With no profiler attached Triton has no launch hooks: hits skip the launch metadata."""
    assert launch_mod._hooks_active() is (launch_mod._knobs is None)


def test_a_new_tensor_at_the_same_alignment_and_dtype_reuses_the_kernel():
    kernel = _Kernel(["x_ptr", "BLOCK"])
    launch_mod.launch(kernel, (1,), torch.zeros(64), BLOCK=16)
    other = torch.ones(64)
    launch_mod.launch(kernel, (1,), other, BLOCK=16)
    assert _paths(kernel) == ["triton", "fast"]
    assert kernel.calls[1][2][0] is other         # the new tensor is what gets launched


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int", "int_to_bool", "float", "constexpr",
                                    "option", "none"])
def test_anything_triton_specializes_on_sends_the_call_back_through_triton(change):
    kernel = _Kernel(["x_ptr", "n", "scale", "BLOCK"])
    base = torch.zeros(64, dtype=torch.bfloat16)
    first = dict(x=base, n=16, scale=0.5, BLOCK=32, num_warps=4)
    second = dict(first)
    if change == "misaligned":
        second["x"] = base[1:]                    # 2 bytes in: no longer 16-byte aligned
        assert second["x"].data_ptr() % 16 != 0
    elif change == "dtype":
        second["x"] = base.float()
    elif change == "int":
        second["n"] = 17                          # loses Triton's divisible-by-16 attribute
    elif change == "int_to_bool":
        first["n"], second["n"] = 1, True         # equal and same hash in Python, different to Triton
    elif change == "float":
        second["scale"] = 0.25
    elif change == "constexpr":
        second["BLOCK"] = 64
    elif change == "option":
        second["num_warps"] = 8
    elif change == "none":
        second["x"] = None
    for call in (first, second):
        launch_mod.launch(kernel, (1,), call["x"], call["n"], call["scale"], BLOCK=call["BLOCK"],
                          num_warps=call["num_warps"])
    assert _paths(kernel) == ["triton", "triton"]


def test_a_parameter_left_to_its_default_keeps_the_ordinary_path():
    kernel = _Kernel(["x_ptr", "BLOCK", "EVEN"])  # EVEN not passed: Triton fills its default
    for _ in range(3):
        launch_mod.launch(kernel, (1,), torch.zeros(4), BLOCK=16)
    assert _paths(kernel) == ["triton"] * 3


def test_no_compiled_kernel_returned_keeps_the_ordinary_path():
    kernel = _Kernel(["x_ptr", "BLOCK"], returns_compiled=False)
    for _ in range(3):
        launch_mod.launch(kernel, (1,), torch.zeros(4), BLOCK=16)
    assert _paths(kernel) == ["triton"] * 3


def test_disabled_interpreted_or_hooked_kernels_always_go_through_triton(monkeypatch):
    kernel = _Kernel(["x_ptr", "BLOCK"])
    monkeypatch.setattr(launch_mod, "ENABLED", False)
    for _ in range(2):
        launch_mod.launch(kernel, (1,), torch.zeros(4), BLOCK=16)
    monkeypatch.setattr(launch_mod, "ENABLED", True)
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    for _ in range(2):
        launch_mod.launch(kernel, (1,), torch.zeros(4), BLOCK=16)
    assert _paths(kernel) == ["triton"] * 4
    interpreted = _Kernel(["x_ptr", "BLOCK"])
    del interpreted.params                        # the interpreter's kernels have no ``params``
    for _ in range(2):
        launch_mod.launch(interpreted, (1,), torch.zeros(4), BLOCK=16)
    assert _paths(interpreted) == ["triton"] * 2
    assert launch_mod.launch_stats() == {}


def test_a_tensor_given_by_keyword_is_never_remembered():
    kernel = _Kernel(["x_ptr", "BLOCK"])
    for _ in range(2):
        launch_mod.launch(kernel, (1,), x_ptr=torch.zeros(4), BLOCK=16)
    assert _paths(kernel) == ["triton"] * 2
    assert launch_mod.launch_stats()["stand_in_kernel"]["entries"] == 0


def test_unhashable_argument_goes_through_triton():
    kernel = _Kernel(["x_ptr", "BLOCK"])
    for _ in range(2):
        launch_mod.launch(kernel, (1,), [1, 2], BLOCK=16)
    assert _paths(kernel) == ["triton"] * 2


def test_table_is_bounded(monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_ENTRIES", 4)
    kernel = _Kernel(["x_ptr", "n", "BLOCK"])
    x = torch.zeros(4)
    for n in range(10):
        launch_mod.launch(kernel, (1,), x, n, BLOCK=16)
    assert launch_mod.launch_stats()["stand_in_kernel"]["entries"] <= 4
    launch_mod.launch(kernel, (1,), x, 9, BLOCK=16)  # the newest entry survives the clearing
    assert _paths(kernel)[-1] == "fast"


def test_ops_route_every_launch_through_the_cache():
    """No kernel in the ops is launched as ``kernel[grid](...)`` directly (which would skip it)."""
    import re
    from pathlib import Path

    import matmamba.ops as ops
    root = Path(ops.__file__).parent
    direct = [f"{path.relative_to(root)}:{number}"
              for path in root.rglob("*.py")
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"\b_\w+_kernel\[", line)]
    assert direct == [], f"launch these through triton_common.launch.launch: {direct}"


def test_host_helpers_match_triton():
    import triton
    for n in range(0, 300):
        assert launch_mod.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 70):
        for b in range(1, 17):
            assert launch_mod.cdiv(a, b) == triton.cdiv(a, b), (a, b)


class _ComputingOps(TorchDispatchMode):
    """Records the names of the aten ops run inside it, except those in ``ignore`` (views and
    allocations: ops that compute nothing)."""

    def __init__(self, ignore: set[str]):
        super().__init__()
        self.ignore = ignore
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in self.ignore:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def test_block_decode_step_launches_five_kernels(monkeypatch):
    """A decode step of the block on the Triton path (launches recorded, not run): the two
    projections and the fused core's three kernels, and no copies, casts or concatenations around
    them (composed from the public ops the step took 11 launches with bf16 weights)."""
    import os
    from unittest import mock

    from matmamba.models.block import MatMamba2
    from matmamba.ops import use_impl
    from matmamba.ops.conv1d import triton_impl as conv_ti
    from matmamba.ops.rmsnorm import triton_impl as norm_ti
    from matmamba.ops.state_update import triton_impl as update_ti

    kernels = []
    for module in (conv_ti, norm_ti, update_ti):
        monkeypatch.setattr(module, "launch", lambda kernel, *a, **k: kernels.append(kernel.fn.__name__))

    views = {"view", "unflatten", "slice", "t", "unsqueeze", "select", "empty", "alias", "detach",
             "as_strided", "_unsafe_view"}  # aten ops that compute nothing: not recorded

    block = MatMamba2(96, d_state=16, headdim=8, layer_idx=0).to(torch.bfloat16).eval()
    conv_state, ssm_state = block.allocate_inference_cache(2)
    u = torch.randn(2, 1, 96, dtype=torch.bfloat16)
    with torch.no_grad(), use_impl("triton"):
        for width in (96, 48):
            block.step(u, conv_state, ssm_state, width=width)  # builds the width's column maps once
            kernels.clear()
            with _ComputingOps(views) as ops_seen:
                block.step(u, conv_state, ssm_state, width=width)
            assert ops_seen.names == ["mm", "mm"], ops_seen.names
            assert kernels == ["_conv_update_kernel", "_state_update_kernel", "_rmsnorm_fwd_kernel"]
    # turned off, the step composes the public ops: copies of x and z, the cat, A's three ops
    from matmamba.ops import use_fused_inference
    for off in (use_fused_inference(False), mock.patch.dict(os.environ, {"MATMAMBA_FUSED_INFERENCE": "0"})):
        with torch.no_grad(), use_impl("triton"), off:
            kernels.clear()
            with _ComputingOps(views) as ops_seen:
                block.step(u, conv_state, ssm_state, width=48)
        assert ops_seen.names == ["mm", "clone", "cat", "_to_copy", "exp", "neg", "clone", "mm"], ops_seen.names
        assert kernels == ["_conv_update_kernel", "_state_update_kernel", "_rmsnorm_fwd_kernel"]


def test_residual_norm_outside_autograd_is_one_launch(monkeypatch):
    """The models' residual RMSNorm, eagerly outside autograd on the Triton path: the norm kernel's
    one launch and no ATen op that computes (its torch form takes about eight); under autograd the
    torch ops; an input of the wrong size an error from them, not a kernel reading past the
    weight."""
    from matmamba.models.common import RMSNorm
    from matmamba.ops import use_impl
    from matmamba.ops.rmsnorm import triton_impl as norm_ti

    kernels = []
    monkeypatch.setattr(norm_ti, "launch", lambda kernel, *a, **k: kernels.append(kernel.fn.__name__))

    norm = RMSNorm(96).to(torch.bfloat16)
    x = torch.randn(2, 1, 96, dtype=torch.bfloat16)
    with use_impl("triton"):
        with torch.no_grad(), _ComputingOps({"view", "_unsafe_view", "empty", "alias", "detach",
                                               "as_strided"}) as seen:
            out = norm(x)
        assert (kernels, seen.names) == (["_rmsnorm_fwd_kernel"], [])
        assert out.shape == x.shape and out.dtype == x.dtype
        kernels.clear()
        norm(x)  # grad mode, weight requires grad: autograd records the torch ops
        assert kernels == []
        with torch.no_grad(), pytest.raises(RuntimeError):
            RMSNorm(48).to(torch.bfloat16)(x)
        assert kernels == []


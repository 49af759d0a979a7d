"""The kernels of a Mamba2 block, each as a dispatching function.

=======================  ==================================================================
``ssd_scan``             the SSD (Mamba2) chunked selective scan, with states and seq_idx
``causal_conv1d``        causal depthwise conv1d + SiLU over channels-last input
``causal_conv1d_update`` its single-token decode step (conv state updated in place)
``gated_rmsnorm``        RMSNorm with a SiLU gate, over groups of channels
``ssd_state_update``     the scan's single-token decode step (SSM state updated in place)
=======================  ==================================================================

Each takes ``impl="auto" | "naive" | "torch" | "triton"``; :func:`use_impl` overrides "auto"
within a ``with`` block (the environment variable ``MATMAMBA_IMPL`` does the same globally), and
:func:`get_default_impl` says what "auto" currently means. See :mod:`matmamba.ops._dispatch`.
:func:`use_fused_inference` (or ``MATMAMBA_FUSED_INFERENCE=0``) turns off the fused inference
paths on CUDA (the block's decode core, the residual norm's kernel) in favour of the ops composed.
The individual implementations live in ``matmamba.ops.<op>.naive``, ``.chunked`` /
``.torch_impl`` and ``.triton_impl``; the exact contracts are in docs/CONTRACTS.md.
"""

from ._dispatch import VALID_IMPLS, fused_inference_enabled, get_default_impl, use_fused_inference, use_impl
from .conv1d import causal_conv1d, causal_conv1d_update
from .rmsnorm import gated_rmsnorm
from .ssd import ssd_scan
from .state_update import ssd_state_update

__all__ = [
    "ssd_scan",
    "causal_conv1d",
    "causal_conv1d_update",
    "gated_rmsnorm",
    "ssd_state_update",
    "use_impl",
    "get_default_impl",
    "use_fused_inference",
    "fused_inference_enabled",
    "VALID_IMPLS",
]

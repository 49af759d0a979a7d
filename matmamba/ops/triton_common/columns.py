"""Column maps: how kernels read channels that live at strided or gathered columns of a tensor
(e.g. x and z inside the block's in_proj output, one (z_h, x_h) pair of rows per head)."""

import triton
import triton.language as tl


@triton.jit
def mapped_columns(map_ptr, index, mask, HAS_MAP: tl.constexpr, VEC: tl.constexpr):
    """Column holding each channel in ``index``: ``map[index]``, or ``index`` itself without a map.

    VEC > 1 promises that each aligned group of VEC channels maps to VEC consecutive, VEC-aligned
    columns (checked on the host), so loads and stores through the map can be vectorised.
    """
    if HAS_MAP:
        cols = tl.load(map_ptr + index, mask=mask, other=0)
        if VEC > 1:
            cols = tl.max_contiguous(tl.multiple_of(cols, VEC), VEC)
        return cols
    return index

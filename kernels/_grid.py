"""Launch grids of the Triton kernels: CUDA's limits, and the 1-D grids every launcher uses.

CUDA allows 2^31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2. Counts such as
``chunks x heads`` (Lightning), ``documents x heads`` or ``batch x heads`` (MoH) pass 65535 at a
few million tokens x heads per call, so those launchers fold all their program indices into axis 0
and the kernels recover them with :func:`unfold`, in the order a 3-D grid would schedule them.
S2 / flash keep (tiles, heads, batch): tiles on axis 0, and heads / batch, far below 65535, read
from ``tl.program_id`` (the divided indices of a folded grid stay live in registers, which tipped
the sm_90 dk/dv kernel into spills). Each op has a ``grids`` function (``s2.triton_fwd``,
``moh.triton_fwd``, ``lightning.triton_fwd``) that tests call without launching anything
(``tests/test_kernel_grids.py``); past CUDA's limits it raises ValueError naming the kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

# programs per grid axis CUDA accepts: x up to 2^31 - 1, y and z up to 65535
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def check_grid(kernel: str, grid: tuple) -> tuple:
    """``grid`` if every axis is within :data:`GRID_LIMITS`, else ValueError naming the kernel."""
    grid = tuple(int(n) for n in grid)
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"{kernel}: launch grid {grid} has {n} programs on axis {axis}, over CUDA's limit of "
                             f"{limit}; split the call (fewer tokens, heads or documents per call)")
    return grid


@triton.jit
def unfold(pid, n0, n1):
    """``pid = i0 + n0 * (i1 + n1 * i2)`` -> ``(i0, i1, i2)``: the program of a 1-D grid as the
    indices of a 3-D grid ``(n0, n1, n2)``, scheduled in the same order."""
    i0 = pid % n0
    rest = pid // n0
    return i0, rest % n1, rest // n1

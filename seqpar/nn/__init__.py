"""seqpar.nn: nn.Modules (projections, routers, norms) built on seqpar.kernels and seqpar.cp.

No collectives here: CP groups are passed in, communication happens in seqpar.cp.
"""

from seqpar.nn.moh import MoHAttention, MoHRouter, MoHRouting

__all__ = ["MoHAttention", "MoHRouter", "MoHRouting"]

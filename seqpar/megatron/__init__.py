"""seqpar.megatron: megatron-core core-attention classes, self-attention modules, layer specs, and the
explicit CPU compatibility shim (one file, used only when CUDA is absent).

The only place where Megatron's [seq, batch, heads, dim] layout is converted.
"""

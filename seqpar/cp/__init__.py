"""seqpar.cp: context parallelism for every attention kind (DESIGN.md §1-2).

``comm.py`` is the only attention-path module that calls torch.distributed.
"""

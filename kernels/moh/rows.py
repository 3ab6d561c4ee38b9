"""Per-head lists of active query rows, built once per call from the gates, on the device.

No host loop over heads, no host sync and no sort: each active row's slot is its rank among the
active rows of its head (an exclusive prefix count), and one scatter writes it there, so the list
is ascending and costs O(rows). The kernels launch one program per possible row tile and the
programs past a head's active count exit at once, so the grid size does not need the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ActiveRows:
    """Compacted row lists for gates ``[b, sq, h]``; ``bh = batch * h + head`` indexes the rows.

    rows   int32 ``[b*h, sq]``: active query rows of head bh first, ascending; entries past
           ``counts[bh]`` are unspecified (never read).
    counts int32 ``[b*h]``: number of active rows of head bh.
    prefix int32 ``[b*h, sq + 1]``: prefix[bh, r] = active rows of head bh below row r; the
           backward kv programs use it to start at the first row tile that can see their keys.
    """

    rows: torch.Tensor
    counts: torch.Tensor
    prefix: torch.Tensor


def build_active_rows(gates: torch.Tensor) -> ActiveRows:
    b, sq, h = gates.shape
    active = (gates > 0).permute(0, 2, 1).reshape(b * h, sq)
    prefix = torch.zeros(b * h, sq + 1, dtype=torch.int32, device=gates.device)
    prefix[:, 1:] = active.cumsum(dim=-1, dtype=torch.int32)
    counts = prefix[:, -1].contiguous()
    # active row r of head bh goes to slot prefix[bh, r]; inactive rows to a spare last column
    slot = torch.where(active, prefix[:, :-1].long(), sq)
    rows = torch.zeros(b * h, sq + 1, dtype=torch.int32, device=gates.device)
    rows.scatter_(1, slot, torch.arange(sq, dtype=torch.int32, device=gates.device).expand(b * h, sq))
    return ActiveRows(rows[:, :sq].contiguous(), counts, prefix)

"""Zero host syncs per layer in steady state, for every kind x scheme (and varlen), and in a model.

Inside ``cp.step_checks()`` a steady-state step (forward + backward of L layers) makes the same
number of host reads and host-to-device copies for L = 1 and L = 2 — none per layer — and exactly
the documented count per step: 1 (the step's deferred data check, one all-reduce + one read) plus 1
for a fresh ``cu_seqlens`` (its values are read once, then cached on the tensor). Counted on CPU by
``cp.count_host_syncs``, which watches every aten op and tensor method of the block, whoever issues
it (tests/test_host_sync_counter.py shows what it sees). The CP cases run the torch backend, whose
CPU-only fallback work is excluded; the kernels' GPU path (plans, launchers) is counted in
tests/test_host_sync_counter.py. Bad data inside a step still raises on every rank, at the step's end.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.kernels import S2Layout

LAYOUT = S2Layout(block_size=16, local_blocks=2, vert_stride=2)


def _cases(world: int) -> list[tuple[str, str, dict]]:
    out = [(k, s, {}) for k, s in sorted(cp.SUPPORTED)]
    doc_lens = [5, 2 * world * 16 - 8, 3]  # sums to n = 2 * world * 16; no multiples of 2P, one shorter than a chunk
    for kind, scheme in sorted(cp.SUPPORTED):  # packed documents under every kind x scheme
        out.append((kind, scheme, {"doc_lens": doc_lens}))
    out.append(("lightning", "allgather", {"state": True}))
    out.append(("lightning", "ring", {"state": True}))
    # allgather + sliding window: the halo exchange's plan is host data built once per partition
    out.append(("softmax", "allgather", {"window": 5}))
    out.append(("softmax", "allgather", {"window": 5, "doc_lens": doc_lens}))
    return out


def _inputs(kind: str, scheme: str, extra: dict, world: int, rank: int) -> tuple[list, dict, Any]:
    g = torch.Generator().manual_seed(0)
    n, h, hkv, d = 2 * world * 16, 4, 2, 16
    full = [torch.randn(1, n, h, d, generator=g), torch.randn(1, n, hkv, d, generator=g),
            torch.randn(1, n, hkv, d, generator=g)]
    kw: dict[str, Any] = {"backend": "torch"}
    cu = None
    if "doc_lens" in extra:
        cu = torch.tensor([0, *torch.tensor(extra["doc_lens"]).cumsum(0).tolist()], dtype=torch.int32)
        kw["cu_seqlens"] = cu.clone()  # a fresh tensor every step, as a data loader gives
        loc = [cp.shard_varlen(t, cu, (rank, world))[0] for t in full]
    else:
        loc = [cp.shard(t, (rank, world)) for t in full]
    loc = [t.requires_grad_() for t in loc]
    if kind == "lightning":
        kw["slope"] = torch.linspace(0.1, 0.5, h)
        if extra.get("state"):
            kw["initial_state"] = torch.zeros(1, h, d, d)
            kw["output_final_state"] = True
    if kind == "s2":
        kw["layout"] = LAYOUT
    if "window" in extra:
        kw["window"] = extra["window"]
    if kind == "moh":
        kw["gates"] = cp.shard(torch.rand(1, n, h, generator=g), (rank, world)).requires_grad_()
    if scheme == "usp":
        kw["ulysses_degree"] = 2
    return loc, kw, cu


def _step(kind, scheme, extra, world, rank, layers: int) -> tuple[int, int, list]:
    (q, k, v), kw, _ = _inputs(kind, scheme, extra, world, rank)
    with cp.count_host_syncs() as n:
        with cp.step_checks():
            loss = 0
            for _ in range(layers):
                o = cp.attention(q, k, v, kind=kind, scheme=scheme, **kw)
                if kind == "lightning":
                    o, final = o
                    if final is not None:
                        loss = loss + final.sum()
                loss = loss + o.float().sum()
            loss.backward()
            body = n.total
        total = n.total
    return body, total - body, list(n.sites)


def _index_builds() -> tuple[int, int, int, int]:
    from seqpar.cp import partition
    from seqpar.kernels.lightning import api as lightning_api
    from seqpar.kernels.moh import api as moh_api

    # device index tensors, resolved partitions (their host plans hang off them), kernel segment tables
    return len(partition._DEVICE_INDEX), len(partition._RESOLVED), len(lightning_api._SEGMENTS), len(moh_api._SEGS)


def _sync_job(rank: int, world: int) -> dict:
    out = {}
    for kind, scheme, extra in _cases(world):
        _step(kind, scheme, extra, world, rank, 1)  # first step: signatures agreed, index plans built
        built = _index_builds()
        one = _step(kind, scheme, extra, world, rank, 1)
        two = _step(kind, scheme, extra, world, rank, 2)
        # steady state builds no index tensor on the host (nothing new is copied to the device)
        assert _index_builds() == built, (kind, scheme, extra)
        out[(kind, scheme, tuple(sorted(extra)))] = (one, two)
    # bad data inside a step raises on every rank at the step's end (rank 1's gates are negative)
    (q, k, v), kw, _ = _inputs("moh", "ring", {}, world, rank)
    if rank == 1:
        kw["gates"] = -kw["gates"].detach()
    try:
        with cp.step_checks():
            cp.attention(q, k, v, kind="moh", scheme="ring", **kw).sum().backward()
        out["bad"] = None
    except ValueError as e:
        out["bad"] = str(e)
    return out


def test_no_host_sync_per_layer_and_one_per_step():
    for per_rank in run_ranks(_sync_job, 2, timeout=600):
        bad = per_rank.pop("bad")
        assert bad is not None and "gates must be >= 0" in bad and "on rank 1" in bad, bad
        for (kind, scheme, extra), (one, two) in per_rank.items():
            varlen = "doc_lens" in extra
            name = f"{kind} x {scheme} {extra}"
            # in the step body: none per layer (the fresh cu_seqlens is read once per step)
            assert one[0] == two[0] == (1 if varlen else 0), (name, one[2], two[2])
            assert one[1] == two[1] == 1, (name, one, two)  # the step's one deferred check


def test_one_off_calls_still_check_data_eagerly():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="gates must be >= 0"):
        cp.attention(q, q[:, :, :1], q[:, :, :1], kind="moh", scheme="ring", group=(0, 1),
                     gates=-torch.ones(1, 4, 2))


def _model_job(rank: int, world: int) -> dict:
    """Steady-state steps of a GPT of every kind at CP=2 (the pattern once and twice), unpacked (ASLH) and packed
    THD documents with a fresh ``cu_seqlens`` tensor every step, as a data loader gives (AL: S2 and
    MoH under CP take no packed sequences). Returns {(varlen, layers): (reads, copies, sites)}."""
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_batch_on_this_cp_rank

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (1, 64), generator=g)
    cu = torch.tensor([0, 16, 40, 64], dtype=torch.int32)  # documents of 16, 24, 24 tokens (multiples of 2P)
    out = {}
    try:
        for varlen in (False, True):
            pattern = "AL" if varlen else "ASLH"
            for layers in (len(pattern), 2 * len(pattern)):
                init_parallel(1, world, seed=3)
                p = replace(preset("tiny"), pattern=pattern, num_layers=layers)
                cfg = transformer_config(p, context_parallel_size=world, seqpar_backend="torch", s2_block_size=16,
                                         s2_local_blocks=1, s2_vert_stride=2, params_dtype=torch.float32,
                                         cp_schemes={"softmax": "allgather" if varlen else "ring", "s2": "allgather",
                                                     "lightning": "allgather", "moh": "ulysses"})
                model = build_gpt(p, cfg, vocab_size=64, max_sequence_length=64)
                if varlen:
                    batch = {"tokens": cp.shard_varlen(tokens, cu, (rank, world))[0],
                             "labels": cp.shard_varlen(torch.roll(tokens, -1, 1), cu, (rank, world))[0]}
                else:
                    batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": torch.roll(tokens, -1, 1)})
                pos = torch.arange(batch["tokens"].shape[1])[None]
                counts = []
                for _ in range(2):  # the second step is steady state
                    kw = {}
                    if varlen:
                        fresh = cu.clone()  # a new tensor every step: its values are read once per step
                        kw["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=fresh,
                                                                  cu_seqlens_kv=fresh, max_seqlen_q=24,
                                                                  max_seqlen_kv=24)
                    with cp.count_host_syncs() as n:
                        with cp.step_checks():
                            loss = model(batch["tokens"], pos, None, labels=batch["labels"], **kw)
                            loss.float().sum().backward()
                    counts.append((n.reads, n.copies, list(n.sites), len(n.excluded)))
                out[(varlen, layers // len(pattern))] = counts[-1]
                parallel_state.destroy_model_parallel()
    finally:
        disable_cpu_compat()
    return out


def test_megatron_model_steady_state_syncs_do_not_grow_with_layers():
    # A GPT of all four kinds at CP=2 (Megatron engine's model and step_checks): a steady-state step of
    # twice the layers makes exactly the host reads and host-to-device copies of the shorter one, by any code
    # (seqpar, megatron-core, torch.nn, autograd), and only the documented ones per step: the step's data
    # check, and with packed documents one read of the step's fresh cu_seqlens (shared by every layer:
    # plans, RoPE positions, CP index tensors).
    for per_rank in run_ranks(_model_job, 2, timeout=900):
        for varlen in (False, True):
            four, eight = per_rank[(varlen, 1)], per_rank[(varlen, 2)]
            assert four[:2] == eight[:2], (varlen, four[2], eight[2])
            sites = sorted(s.split(" ")[0] + " " + s.split("/")[-1].split(":")[0] for s in eight[2])
            want = ["aten._local_scalar_dense.default validation.py"]  # the step's data check
            if varlen:
                want = sorted(want + ["Tensor.tolist _common.py"])  # host_ints of the step's cu_seqlens
            assert sites == want, (varlen, eight[2])
            # it was watching: the torch fallbacks' own host reads (CPU-only work) were seen and set apart
            assert eight[3] > four[3] > 0, (four[3], eight[3])

"""Automatic CP schemes (#22 item 6): the topology, the time model, cp.recommend over usp degrees and
hierarchical layouts, and ``parallel.cp_schemes: auto`` in the recipe, --check and --dry-run.

Every case of the table asserts the choice *and* the predicted time against the closed form written
out here from the documented model (docs/cp.md "Automatic schemes"), not from seqpar's code."""

from __future__ import annotations

import json

import pytest
import yaml

from seqpar import cp

PEAK = 989.4e12  # the default peak (H100 SXM dense bf16), FLOP/s
INTRA, INTER = 450e9, 50e9  # the NVLink / InfiniBand defaults, B/s
E = 2  # bf16 bytes


def softmax_flops(n: int, h: int, d: int) -> float:
    """Causal softmax, forward + backward with the kernels' recompute: 2(d+dv) + 2(3d+2dv) per pair."""
    return (2 * (d + d) + 2 * (3 * d + 2 * d)) * h * n * (n + 1) / 2


def lightning_flops(n: int, h: int, d: int, chunk: int = 64) -> float:
    """Lightning: per token and head 2(dk+dv)(C+1)/2 + 4 dk dv forward, backward twice that."""
    return 3 * n * h * (2 * (d + d) * (chunk + 1) / 2 + 4 * d * d)


def a2a(p: int, local: int, heads: int, d: int) -> int:
    """One Ulysses all-to-all of a [local, heads, d] tensor over p ranks (received bytes)."""
    return (p - 1) * local * (heads // p) * d * E


# (name, recommend kwargs, expected label, closed-form bytes, closed-form time)
def _cases():
    out = []
    # 1. Lightning intra-node: LASP-2 moves 2 fp32 states per rank (zigzag) whatever N is; Ulysses moves O(N)
    p, n, h, d = 4, 4096, 8, 64
    b = 2 * (p - 1) * 2 * h * d * d * 4  # all-gather forward + reduce-scatter backward
    out.append(("lightning -> LASP-2", dict(kind="lightning", world=p, seq_len=n, heads=h, kv_heads=h, head_dim=d),
                "allgather", b, lightning_flops(n, h, d) / p / PEAK + b / INTRA))
    # 2. softmax, heads % P == 0, intra-node, large N: Ulysses's four all-to-alls of H/P heads beat the
    #    all-gather's full K/V (ranked without overlap: every scheme computes the same T_c)
    p, n = 4, 8192
    b = 2 * 4 * a2a(p, n // p, h, d)
    out.append(("softmax intra -> ulysses", dict(kind="softmax", world=p, seq_len=n, heads=h, kv_heads=h, head_dim=d),
                "ulysses", b, softmax_flops(n, h, d) / p / PEAK + b / INTRA))
    # 3. the same with overlap credited and a slow kernel (100 TFLOP/s): the ring hides every hop behind its
    #    blocks (its transfers < 3/4 of the compute), so its time is the compute alone
    ring_b = 0  # busiest rank 0 under zigzag: (2P-2) c rows forward, again + (P-1) c fp32 dK/dV rows backward
    c, row = n // (2 * p), h * 2 * d
    ring_b = (2 * p - 2) * c * row * E * 2 + (p - 1) * c * row * 4
    out.append(("softmax, overlap, compute-bound -> ring",
                dict(kind="softmax", world=p, seq_len=n, heads=h, kv_heads=h, head_dim=d, overlap=True,
                     peak_tflops=100.0), "ring", ring_b, softmax_flops(n, h, d) / p / 100e12))
    # 4. CP = 16 over two 8-GPU nodes: Ulysses inside each node x ring across the two (usp, U = 8)
    p, u, n, h, hkv = 16, 8, 4096, 16, 8
    uly = 2 * (2 * a2a(u, n // p, h, d) + 2 * a2a(u, n // p, hkv, d))
    c, row = n // 4, (hkv // u) * 2 * d  # ring over 2 merged groups of N/2 tokens, 1 kv head per member
    ring = 2 * c * row * E * 2 + c * row * 4
    out.append(("CP spans nodes -> usp(U=gpus_per_node)",
                dict(kind="softmax", world=p, seq_len=n, heads=h, kv_heads=hkv, head_dim=d), "usp(U=8)", uly + ring,
                softmax_flops(n, h, d) / p / PEAK + uly / INTRA + ring / INTER))
    # 5. heads not divisible by P: no Ulysses; the all-gather of the 2 kv heads wins
    p, n, h, hkv = 4, 4096, 6, 2
    b = 2 * (p - 1) * (n // p) * hkv * 2 * d * E
    out.append(("heads % P != 0 -> no ulysses", dict(kind="softmax", world=p, seq_len=n, heads=h, kv_heads=hkv,
                                                     head_dim=d), "allgather", b,
                softmax_flops(n, h, d) / p / PEAK + b / INTRA))
    # 6. sliding window w <= a zigzag chunk c = N/2P, overlap, 100 TFLOP/s: the ring moves only the w - 1 rows
    #    before each chunk (a middle rank: from both neighbours, forward; backward again + its own rows' fp32
    #    dK/dV) and hides them; the busiest rank computes 2c tokens x w keys (rank 0's first chunk fewer)
    p, n, h, w = 4, 8192, 8, 256
    c, row = n // (2 * p), h * 2 * d
    pair = 2 * (d + d) + 2 * (3 * d + 2 * d)
    out.append(("softmax window, overlap -> ring moves the halo",
                dict(kind="softmax", world=p, seq_len=n, heads=h, kv_heads=h, head_dim=d, overlap=True,
                     peak_tflops=100.0, window=w), "ring", 2 * (w - 1) * row * (2 * E + 4),
                pair * h * 2 * c * w / 100e12))
    return out


@pytest.mark.parametrize("name, kw, label, nbytes, seconds", _cases(), ids=[c[0] for c in _cases()])
def test_recommend_table(name, kw, label, nbytes, seconds):
    overlap = kw.get("overlap", False)
    rec = cp.recommend(**kw)
    best = rec.best
    assert best.label == label, rec.times()
    assert (rec.scheme, rec.ulysses_degree) == (best.scheme, best.ulysses_degree)
    assert best.bytes == nbytes
    assert best.predicted(overlap) == pytest.approx(seconds, rel=1e-9)
    assert best.time_no_overlap_s == pytest.approx(best.compute_s + best.comm_s, rel=1e-12)
    assert best.time_s <= best.time_no_overlap_s
    times = rec.times()  # fastest first, every valid layout considered
    assert list(times.values()) == sorted(times.values())
    h, p = kw["heads"], kw["world"]
    assert ("ulysses" in times) == (h % p == 0)
    assert {c.ulysses_degree for c in rec.candidates if c.scheme == "usp"} == {
        u for u in range(2, p) if p % u == 0 and h % u == 0}
    assert ("ring" in times) == (kw["kind"] != "lightning")  # LASP-1 is never a candidate


def test_overlap_model_and_links():
    """Non-ring schemes gain nothing from overlap; the ring's exposed transfer is T_m - T_c (P-1)/P; usp
    crosses the inter-node link only with its ring group."""
    kw = dict(world=4, seq_len=2048, heads=8, kv_heads=8, head_dim=64)
    rec = cp.recommend("softmax", overlap=True, **kw)
    by = {c.label: c for c in rec.candidates}
    for lab in ("allgather", "ulysses"):
        assert by[lab].time_s == by[lab].time_no_overlap_s
    r = by["ring"]
    assert r.time_s == pytest.approx(r.compute_s + max(0.0, r.comm_s - r.compute_s * 3 / 4), rel=1e-12)
    hier = cp.recommend("softmax", world=16, seq_len=1024, heads=16, kv_heads=8, head_dim=64,
                        topology=cp.Topology(gpus_per_node=8), ulysses_degrees=[8])
    links = {c.label: dict(c.links) for c in hier.candidates}
    assert links["usp(U=8)"] == {"ulysses": "intra", "ring": "inter"} and links["allgather"] == {"cp": "inter"}
    assert set(links) == {"allgather", "ring", "ulysses", "usp(U=8)"}  # ulysses_degrees restricts usp only


def test_recommend_sees_the_window_halo():
    """A sliding window reaches the chooser through scheme_cost: allgather moves only the halo (one
    all-to-all each way), fewer bytes than the ring, and wins where full causal softmax picks Ulysses;
    the FLOPs are the window's."""
    kw = dict(world=8, seq_len=1 << 17, heads=32, kv_heads=8, head_dim=128, balance="contiguous")
    full, win = cp.recommend("softmax", **kw), cp.recommend("softmax", window=4096, **kw)
    assert full.scheme == "ulysses" and win.scheme == "allgather"
    by = {c.label: c for c in win.candidates}
    halo = cp.scheme_cost("softmax", "allgather", window=4096, **kw)
    assert set(halo["fwd"]) == set(halo["bwd"]) == {"all_to_all"}
    assert by["allgather"].bytes == sum(x["bytes"] for side in halo.values() for x in side.values())
    assert by["allgather"].bytes < by["ring"].bytes
    assert by["allgather"].compute_s < {c.label: c for c in full.candidates}["allgather"].compute_s / 10


@pytest.mark.parametrize("tp, world, gpus, inter", [
    (1, 8, 8, False), (2, 4, 8, False), (2, 8, 8, True), (1, 3, 8, True),  # 3 ranks: some replica straddles
    (1, 16, 16, False), (4, 2, 8, False)])
def test_topology_places_groups_like_megatron(tp, world, gpus, inter):
    topo = cp.Topology(gpus_per_node=gpus, tensor_parallel=tp)
    assert topo.spans_nodes(world, [list(range(world))]) == inter
    assert topo.link(world, [list(range(world))]) == (("inter", INTER) if inter else ("intra", INTRA))


@pytest.mark.parametrize("kw, msg", [
    (dict(gpus_per_node=0), "Topology.gpus_per_node must be a positive int"),
    (dict(intra_node_gbytes_per_s=float("nan")), "Topology.intra_node_gbytes_per_s must be a finite number > 0"),
    (dict(inter_node_gbytes_per_s=-5), "Topology.inter_node_gbytes_per_s"),
    (dict(tensor_parallel=True), "Topology.tensor_parallel"),
])
def test_topology_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cp.Topology(**kw)


def test_recommend_rejects_bad_input():
    kw = dict(seq_len=1024, heads=8, kv_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="kind must be one of"):
        cp.recommend("mamba", world=2, **kw)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        cp.recommend("softmax", world=1, **kw)
    with pytest.raises(ValueError, match="needs layout="):
        cp.recommend("s2", world=2, **kw)
    with pytest.raises(ValueError, match="peak_tflops"):
        cp.recommend("softmax", world=2, peak_tflops=0, **kw)
    with pytest.raises(ValueError, match="usp needs ulysses_degree"):
        cp.predict("softmax", "usp", world=4, ulysses_degree=3, **kw)


def test_choose_schemes_shares_one_usp_degree():
    """A model has one usp_ulysses_degree: the plan is the least summed time over every shared degree."""
    from seqpar.kernels import S2Layout

    layers = {"softmax": 3, "lightning": 2, "s2": 1}
    kw = dict(world=8, seq_len=2048, heads=8, kv_heads=4, head_dim=64, topology=cp.Topology(gpus_per_node=2))
    plan = cp.choose_schemes(layers, layouts={"s2": S2Layout(block_size=16)}, **kw)
    totals = {}
    for u in (1, 2, 4):
        totals[u] = sum(n * next(c.time_no_overlap_s for c in plan.per_kind[k].candidates
                                 if c.scheme != "usp" or c.ulysses_degree == u) for k, n in layers.items())
    assert plan.time_s() == pytest.approx(min(totals.values()), rel=1e-12)
    assert ("usp" in plan.schemes.values()) == (plan.ulysses_degree > 1)
    for k in layers:  # each kind's choice is the fastest candidate allowed by the shared degree
        c = plan.chosen(k)
        assert c.scheme != "usp" or c.ulysses_degree == plan.ulysses_degree


def test_predict_prices_the_cost_partition_and_the_window():
    """balance='cost' prices every kind on the *model's* cost partition (not zigzag's); a window changes
    the softmax FLOPs and per-rank work; a window on another kind is refused."""
    from seqpar.kernels import S2Layout
    from seqpar.kernels.flops import attention_flops

    # two documents of 19 and 13 tokens, 16-token S2 blocks: zigzag leaves this S2 + softmax model 3.3 %
    # off balance, the cost balancer 1.1 % (each kind's own share differs from zigzag's either way)
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=2)
    kw = dict(world=2, seq_len=32, heads=4, kv_heads=4, head_dim=64, cu_seqlens=[0, 19, 32])
    model = cp.CostModel(layers={"s2": 1, "softmax": 1}, heads=4, kv_heads=4, s2_layout=lay)
    part = cp.make_partition(32, (0, 2), balance="cost", cost=model, cu_seqlens=kw["cu_seqlens"])
    assert model.imbalance(part) < model.imbalance(cp.make_partition(32, (0, 2), cu_seqlens=kw["cu_seqlens"]))
    for kind, extra in (("softmax", {}), ("s2", {"layout": lay})):
        got = cp.predict(kind, "allgather", balance="cost", cost=model, **extra, **kw)
        work = cp.CostModel(layers={kind: 1}, heads=4, kv_heads=4, s2_layout=lay)
        flops = sum(attention_flops(kind, batch=1, seq_len=n, heads=4, head_dim=64, kv_heads=4, backward=True,
                                    layout=lay if kind == "s2" else None) for n in (19, 13))
        assert got.compute_s == pytest.approx(flops * work.imbalance(part) / 2 / PEAK, rel=1e-12)
        zig = cp.predict(kind, "allgather", **extra, **kw)
        assert got.compute_s != pytest.approx(zig.compute_s, rel=1e-6)  # the partition is the cost balancer's
    kw = dict(world=4, seq_len=4096, heads=8, kv_heads=8, head_dim=64)
    win = cp.predict("softmax", "ring", window=64, **kw)
    assert win.compute_s < cp.predict("softmax", "ring", **kw).compute_s / 10
    with pytest.raises(ValueError, match="window is the softmax layers' sliding window, got it for kind='s2'"):
        cp.predict("s2", "ring", window=64, layout=lay, **kw)
    with pytest.raises(ValueError, match="balance"):  # the cost balancer needs the model
        cp.predict("softmax", "ring", balance="cost", **kw)


# ---------------------------------------------------------------------------------------------------
# the recipe: parallel.cp_schemes: auto

def _recipe(**parallel):
    return {"model": {"preset": "tiny-hybrid", "pattern": "AL", "num_attention_heads": 8, "num_kv_heads": 8,
                      "hidden_size": 512, "dtype": "bf16"},
            "parallel": {"context_parallel": 4, "cp_schemes": "auto", **parallel}, "data": {"seq_len": 8192}}


def test_recipe_auto_resolves_before_anything_reads_the_schemes():
    from seqpar.train.config import from_dict

    cfg = from_dict(_recipe())  # cases 1 and 2 above, one model: softmax -> ulysses, lightning -> LASP-2
    assert cfg.parallel.cp_schemes == {"softmax": "ulysses", "s2": "allgather", "lightning": "allgather",
                                       "moh": "allgather"}
    assert cfg.parallel.usp_ulysses_degree == 1 and cfg.cp_auto.plan.layers == {"softmax": 2, "lightning": 2}
    assert cfg.cp_auto.plan.chosen("softmax").time_no_overlap_s == pytest.approx(
        softmax_flops(8192, 8, 64) / 4 / PEAK + 2 * 4 * a2a(4, 2048, 8, 64) / INTRA, rel=1e-9)
    # two 2-GPU nodes: lightning's Ulysses x LASP-2 (all-to-all inside the node) wins, and sets the degree
    cfg = from_dict(_recipe(gpus_per_node=2))
    assert cfg.parallel.cp_schemes["lightning"] == "usp" and cfg.parallel.usp_ulysses_degree == 2
    # the resolved recipe reads back as itself (what --check prints and checkpoints store)
    again = from_dict(cfg.to_dict())
    assert again.parallel == cfg.parallel and again.cp_auto is None
    # the model is built from the resolved fields
    from seqpar.train.runtime import model_config

    mc = model_config(cfg)
    assert mc.cp_schemes == cfg.parallel.cp_schemes and mc.usp_ulysses_degree == 2


def test_recipe_auto_sees_cp_balance_and_the_window():
    """The recipe's placement (parallel.cp_balance: cost: the whole model's cost partition) and
    model.softmax_window reach the prediction --dry-run prints and the choice."""
    from seqpar.train.config import from_dict
    from seqpar.train.cp_plan import model_inputs, report
    from seqpar.train.runtime import cost_model

    rec = _recipe(cp_balance="cost")
    rec["model"].update(softmax_window=512)
    cfg = from_dict(rec)
    layers, kw = model_inputs(cfg)
    assert kw["balance"] == "cost" and kw["cost"] == cost_model(cfg) and kw["softmax_window"] == 512
    rep = report(cfg, cfg.cp_auto)
    want = cp.predict("softmax", cfg.parallel.cp_schemes["softmax"], world=4, seq_len=8192, heads=8, kv_heads=8,
                      head_dim=64, balance="cost", cost=cost_model(cfg), window=512,
                      **({"ulysses_degree": cfg.parallel.usp_ulysses_degree}
                         if cfg.parallel.cp_schemes["softmax"] == "usp" else {}))
    assert rep["kinds"]["softmax"]["time_ms"] == pytest.approx(want.time_s * 1e3, rel=1e-12)
    full = report(from_dict(_recipe()), None)["kinds"]["softmax"]  # no window: 16x the softmax work
    assert rep["kinds"]["softmax"]["compute_ms"] < full["compute_ms"] / 8


@pytest.mark.parametrize("parallel, line", [
    ({"gpus_per_node": 0}, "parallel.gpus_per_node: got 0 (int); expected an integer >= 1"),
    ({"intra_node_gbytes_per_s": -450},
     "parallel.intra_node_gbytes_per_s: got -450 (int); expected a finite number > 0"),
    ({"inter_node_gbytes_per_s": "50GB/s"},
     "parallel.inter_node_gbytes_per_s: got '50GB/s' (string); expected a finite number > 0"),
    ({"cp_auto_overlap": "yes"}, "parallel.cp_auto_overlap: got 'yes' (string); expected true or false"),
    ({"cp_schemes": "fastest"}, "parallel.cp_schemes: got 'fastest' (string); expected 'auto' or a mapping"),
    ({"usp_ulysses_degree": 2}, "parallel.usp_ulysses_degree=2 is chosen by parallel.cp_schemes: auto"),
])
def test_recipe_bad_topology_is_one_clear_error(parallel, line):
    from seqpar.train.config import RecipeError, from_dict

    with pytest.raises(RecipeError) as e:
        from_dict(_recipe(**parallel))
    assert e.value.lines == [e.value.lines[0]] and e.value.lines[0].startswith(line), e.value.lines


def test_check_and_dry_run_print_the_choice(tmp_path, capsys, monkeypatch):
    from seqpar.train import cli

    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    recipe = tmp_path / "auto.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe(), "train": {"out_dir": str(tmp_path / "run")},
                                      "data": {"seq_len": 8192, "dataset": "mqar", "global_batch": 4}}))
    assert cli.main([str(recipe), "--check"]) == 0
    out = capsys.readouterr().out
    assert "# parallel.cp_schemes: auto -> {'lightning': 'allgather', 'softmax': 'ulysses'}" in out
    resolved = yaml.safe_load(out)
    assert resolved["parallel"]["cp_schemes"]["softmax"] == "ulysses"
    assert cli.main([str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(x.startswith("CP schemes (chosen by parallel.cp_schemes: auto; CP=4, 8 GPUs/node") for x in lines)
    row = next(x.split() for x in lines if x.split()[:1] == ["softmax"])
    assert row[1:3] == ["2", "ulysses"] and float(row[3]) == pytest.approx(2 * 4 * a2a(4, 2048, 8, 64) / 1e6, abs=1e-3)
    t = softmax_flops(8192, 8, 64) / 4 / PEAK + 2 * 4 * a2a(4, 2048, 8, 64) / INTRA
    assert float(row[6]) == pytest.approx(t * 1e3, abs=1e-4)
    assert any("others:" in x and "allgather" in x for x in lines)
    rep = json.loads(lines[0])["cp"]  # the machine-readable line carries the same
    assert rep["auto"] and rep["kinds"]["lightning"]["scheme"] == "allgather"
    assert [c["scheme"] for c in rep["kinds"]["softmax"]["candidates"]][0] == "ulysses"
    # a recipe that fixes its schemes gets the same prediction for them (ring: hops behind the blocks)
    from seqpar.train.config import from_dict

    fixed = cli.dry_run(from_dict({**_recipe(), "parallel": {"context_parallel": 4, "cp_schemes": {"softmax": "ring"}}}))
    ring = cp.predict("softmax", "ring", world=4, seq_len=8192, heads=8, kv_heads=8, head_dim=64)
    assert not fixed["cp"]["auto"] and fixed["cp"]["kinds"]["softmax"]["time_ms"] == pytest.approx(ring.time_s * 1e3)
    assert "CP schemes (from parallel.cp_schemes; CP=4" in capsys.readouterr().out
    # launched with another number of processes per node than the choice assumed: refused, before anything
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.main([str(recipe), "--check"]) == 2
    assert "parallel.gpus_per_node=8, but this launch runs 2 processes per node" in capsys.readouterr().err

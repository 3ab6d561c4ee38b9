"""Checkpoint faults (issue #16): crafted pickles never run, corrupt files are named and skipped (or
stop the run), a resume with another model is refused, an existing run is never overwritten by
accident, keep_last prunes, and tensorboard keeps every step exactly once across a resume.

One small run (1 rank, MQAR, 4 layers) writes the checkpoints every test copies and damages."""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil

import pytest
import torch

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny", "model.pattern=ASLH", "data.dataset=mqar", "data.seq_len=32", "data.global_batch=2",
       "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4", "optim.warmup_steps=1",
       "train.progress=false", "parallel.backend=torch", "parallel.context_parallel=1", "train.save_every=1"]


def _cfg(out: str, *extra: str):
    from seqpar.train.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + [f"train.out_dir={out}", *extra])


def _runs(rank: int, world: int, out: str, plan: list):
    """Each (overrides, resume) of ``plan`` in turn; an exception is returned as (type name, message)."""
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    res = []
    for extra, resume in plan:
        try:
            res.append(train(_cfg(out, *extra), resume=resume))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            res.append((type(e).__name__, str(e)))
            parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """steps 1..3 saved every step with keep_last=2, then resumed to step 5: returns (out dir, losses)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    res = run_ranks(_runs, 1, str(out), [(["train.steps=3", "train.keep_last=2"], False),
                                         (["train.steps=5", "train.keep_last=0"], True)], timeout=300)[0]
    return out, res


def _copy(run, tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(run[0], dst)
    return dst


class Payload:
    """Unpickling this calls exec(), which creates the marker file: proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


# --- keep_last, tensorboard, the saved recipe ------------------------------------------------------

def test_keep_last_and_tensorboard_steps_once(run):
    out, res = run
    assert len(res[0]) == 3 and len(res[1]) == 2, res
    ck = out / "checkpoints"
    # keep_last=2 pruned step 1 while the first run saved 1, 2, 3; the resumed run (keep_last=0) keeps all
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_0000002", "step_0000003", "step_0000004",
                                                          "step_0000005"]
    assert (ck / "latest").read_text() == "step_0000005"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for f in sorted((out / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")] if "train/loss" in acc.Tags()["scalars"] else []
    assert sorted(steps) == [1, 2, 3, 4, 5], steps  # purge_step kept step 3 (the checkpoint's own point)


def test_rng_and_metadata_are_not_pickled(run):
    import json

    from seqpar.train import integrity

    step = run[0] / "checkpoints" / "step_0000005"
    cfg = json.loads((step / "config.json").read_text())
    assert cfg["train"]["steps"] == 5 and cfg["model"]["pattern"] == "ASLH"
    md = integrity.read_dcp_metadata(step / ".metadata")
    kinds = {k: type(v).__name__ for k, v in md.state_dict_metadata.items()}
    assert kinds["rng.cpu"] == "TensorStorageMetadata" and md.state_dict_metadata["rng.cpu"].size[0] == 1
    # the only byte items are megatron's per-linear _extra_state objects (None here); they, like every
    # byte item, are read through torch's weights-only unpickler (test_malicious_object_...)
    assert all(k.split("/")[0].endswith("._extra_state") for k, v in kinds.items() if v == "BytesStorageMetadata")


# --- restricted unpickling --------------------------------------------------------------------------

def test_malicious_metadata_refused_and_nothing_runs(run, tmp_path):
    from seqpar.train import integrity
    from seqpar.train.checkpoint import resumable

    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_0000005"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    # as written by an attacker who also rewrote the manifest (it detects corruption, it is no signature)
    integrity.write_manifest(step)
    assert resumable(out / "checkpoints") == step
    with pytest.raises(integrity.UnsafeCheckpointError, match=r"refusing to unpickle builtins\.exec from .*\.metadata"):
        integrity.read_dcp_metadata(step / ".metadata")
    assert not marker.exists()
    # the payload is real: plain pickle (what DCP's FileSystemReader uses) runs it
    pickle.loads((step / ".metadata").read_bytes())
    assert marker.read_text() == "pwned"


def _resume_into(rank: int, world: int, out: str):
    """A real --resume (loop + checkpoint.load) of a checkpoint; returns the error it raised."""
    return _runs(rank, world, out, [(["train.steps=6"], True)])[0]


def test_malicious_metadata_on_resume(run, tmp_path):
    from seqpar.train import integrity

    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_0000005"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    integrity.write_manifest(step)
    err = run_ranks(_resume_into, 1, str(out), timeout=300)[0]
    assert err[0] == "UnsafeCheckpointError" and "refusing to unpickle builtins.exec" in err[1], err
    assert not marker.exists()


def test_malicious_object_and_common_blobs_refused(tmp_path):
    """A pickled byte item (what a ShardedObject such as the old RNG state is) and a crafted common.pt
    go through torch's weights-only unpickler: refused, and the payload never runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    run_ranks(_save_object_checkpoint, 1, str(folder), str(marker), timeout=120)
    assert not marker.exists()
    err = run_ranks(_load_object_checkpoint, 1, str(folder), True, timeout=120)[0]
    assert err[0] == "UnsafeCheckpointError" and "refusing to unpickle builtins.exec from checkpoint object 'rng_state" in err[1], err
    assert not marker.exists()
    # the same file through megatron-core's default strategy runs the payload: the test is real
    run_ranks(_load_object_checkpoint, 1, str(folder), False, timeout=120)
    assert marker.exists()
    marker.unlink()

    from seqpar.train import integrity

    torch.save({"step": Payload(marker)}, folder / "common.pt")
    with pytest.raises(integrity.UnsafeCheckpointError, match=r"refusing to unpickle .*common\.pt"):
        integrity.load_common(folder)
    assert not marker.exists()


def _save_object_checkpoint(rank: int, world: int, folder: str, marker: str):
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from seqpar.megatron import enable_cpu_compat
    from seqpar.train.checkpoint import write_sharded

    enable_cpu_compat()
    os.makedirs(folder)
    sd = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4), replica_id=0),
          "rng": ShardedObject("rng_state", Payload(pathlib.Path(marker)), (1,), (0,), replica_id=0)}
    write_sharded(sd, pathlib.Path(folder))


def _load_object_checkpoint(rank: int, world: int, folder: str, safe: bool):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from seqpar.train import integrity

    sd = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), replica_id=0),
          "rng": ShardedObject("rng_state", None, (1,), (0,), replica_id=0)}
    try:
        (integrity.safe_load if safe else dist_checkpointing.load)(sd, folder)
    except integrity.UnsafeCheckpointError as e:
        return type(e).__name__, str(e)
    return None


# --- corruption -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["flip", "truncate", "missing", "extra"])
def test_corruption_is_named(run, tmp_path, fault):
    from seqpar.train import integrity

    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_0000005"
    target = step / "__0_0.distcp"
    if fault == "flip":
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
        target.write_bytes(bytes(data))
        why = "contents changed"
    elif fault == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
        why = "truncated"
    elif fault == "missing":
        target.unlink()
        why = "missing"
    else:
        target = step / "evil.py"
        target.write_text("print('hi')")
        why = "not in the manifest"
    with pytest.raises(integrity.CorruptCheckpointError) as e:
        integrity.verify(step)
    assert e.value.file == target.name and why in str(e.value), str(e.value)


def test_fallback_to_newest_intact_or_stop(run, tmp_path, capsys):
    from seqpar.train.checkpoint import resumable
    from seqpar.train.integrity import CorruptCheckpointError

    out = _copy(run, tmp_path)
    ck = out / "checkpoints"
    (ck / "step_0000005" / "common.pt").write_bytes(b"")
    (ck / "step_0000004" / "manifest.json").unlink()
    assert resumable(ck, "fallback") == ck / "step_0000003"
    err = capsys.readouterr().err
    assert "step_0000005 is corrupt: common.pt: truncated" in err and "falling back to " + str(ck / "step_0000003") \
        in err and "also corrupt: step_0000004" in err, err
    with pytest.raises(CorruptCheckpointError, match=r"step_0000005 is corrupt: common\.pt: truncated.*=stop"):
        resumable(ck, "stop")
    for p in ck.glob("step_*"):
        (p / "metadata.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint to fall back to"):
        resumable(ck, "fallback")


def _resume_corrupt(rank: int, world: int, out: str):
    return _runs(rank, world, out, [(["train.steps=6", "train.on_corrupt_checkpoint=fallback"], True)])[0]


def test_resume_falls_back_and_continues(run, tmp_path):
    out = _copy(run, tmp_path)
    f = out / "checkpoints" / "step_0000005" / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[100:4196] = bytes(4096)
    f.write_bytes(bytes(data))
    losses = run_ranks(_resume_corrupt, 1, str(out), timeout=300)[0]
    assert isinstance(losses, list) and len(losses) == 2, losses  # steps 5 and 6 from step_0000004
    assert (out / "checkpoints" / "latest").read_text() == "step_0000006"


# --- resume with another recipe, existing out_dir ---------------------------------------------------

def test_compare_configs():
    from seqpar.train.checkpoint import ConfigMismatchError, compare_configs

    a = _cfg("x", "train.steps=50").to_dict()
    assert compare_configs(a, a) == []
    b = _cfg("x", "train.steps=300", "optim.lr=3e-4", "parallel.cp_schemes.moh=ring").to_dict()
    assert compare_configs(a, b) == ['optim.lr: 0.003 -> 0.0003', 'parallel.cp_schemes: {"softmax": "ring", "s2": '
                                     '"allgather", "lightning": "allgather", "moh": "allgather"} -> {"softmax": '
                                     '"ring", "s2": "allgather", "lightning": "allgather", "moh": "ring"}',
                                     "train.steps: 50 -> 300"]
    c = _cfg("x", "model.pattern=SALH", "model.num_kv_heads=4", "data.vocab_size=128").to_dict()
    with pytest.raises(ConfigMismatchError) as e:
        compare_configs(a, c, "step_0000050")
    msg = str(e.value)
    assert 'model.pattern: "ASLH" -> "SALH"' in msg and "model.num_kv_heads: null -> 4" in msg
    assert "data.vocab_size: 64 -> 128" in msg and "step_0000050" in msg


def test_resume_with_other_model_or_finished_run(run, tmp_path):
    out = _copy(run, tmp_path)
    res = run_ranks(_runs, 1, str(out), [(["train.steps=6", "model.pattern=SALH"], True),
                                         (["train.steps=5"], True),
                                         (["train.steps=6"], False)], timeout=300)[0]
    assert res[0][0] == "ConfigMismatchError" and 'model.pattern: "ASLH" -> "SALH"' in res[0][1], res[0]
    assert res[1][0] == "ResumeError" and "already the end of the run (train.steps=5)" in res[1][1], res[1]
    assert res[2][0] == "ResumeError" and "already holds a run" in res[2][1] and "--resume" in res[2][1], res[2]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000005"  # nothing was touched


def test_overwrite_deletes_the_previous_run(run, tmp_path):
    from seqpar.train.checkpoint import prepare_out_dir

    out = _copy(run, tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run .*train\.overwrite=true"):
        prepare_out_dir(out, resume=False, overwrite=False)
    prepare_out_dir(out, resume=True, overwrite=False)
    prepare_out_dir(out, resume=False, overwrite=True)
    assert not (out / "checkpoints").exists() and not (out / "tb").exists()
    prepare_out_dir(out, resume=False, overwrite=False)  # now empty: fine


def test_lr_jump_is_reported():
    """A finished 50-step run resumed under a 300-step schedule: the LR jump is printed with the changes."""
    from seqpar.train.checkpoint import _lr_jump

    a = _cfg("x", "train.steps=50", "optim.lr=3e-3", "optim.min_lr=3e-4").to_dict()
    b = _cfg("x", "train.steps=300", "optim.lr=3e-3", "optim.min_lr=3e-4").to_dict()
    line = _lr_jump(a, b, 50)
    assert line.startswith("\n  -> the learning rate at step 50 changes from 0.0003 to 0.00"), line
    assert _lr_jump(a, a, 50) == ""

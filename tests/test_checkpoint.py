"""Checkpoint bookkeeping: `latest` only ever names a complete checkpoint."""

import json

import pytest

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.run import checkpoint

META = {"method": "bp", "stages": 2, "data_parallel": 1, "model_spec_sha256": "a", "tokenizer_sha256": "b",
        "micro_batch_size": 3, "micro_batches": 4, "seq_len": 64, "seed": 1}


def make_checkpoint(run_dir, step, complete=True):
    folder = run_dir / "checkpoints" / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "layer_00-model_states.pt").write_bytes(b"x")
    if complete:
        (folder / checkpoint.MARKER).write_text(json.dumps({**META, "step": step}))
    return folder


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step_0000001")
    atomic_write_text(target, "step_0000002")
    assert target.read_text() == "step_0000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_latest_complete(tmp_path):
    assert checkpoint.latest_complete(tmp_path) is None
    make_checkpoint(tmp_path, 10)
    atomic_write_text(tmp_path / "checkpoints" / "latest", "step_0000010")
    tag, meta = checkpoint.latest_complete(tmp_path)
    assert tag == "step_0000010" and meta["step"] == 10


def test_latest_pointing_at_an_incomplete_checkpoint_is_refused(tmp_path):
    make_checkpoint(tmp_path, 10, complete=False)
    atomic_write_text(tmp_path / "checkpoints" / "latest", "step_0000010")
    with pytest.raises(UserError, match="missing or corrupt"):
        checkpoint.latest_complete(tmp_path)


def test_incomplete_folders_are_removed_and_complete_ones_kept(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)  # a save that was killed half-way
    assert checkpoint.remove_incomplete(tmp_path) == ["step_0000020"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000010"]


def test_pruning_keeps_the_newest_complete(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    checkpoint._prune(tmp_path / "checkpoints", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]


def test_another_replica_count_with_the_same_global_batch_resumes_unless_zero_sharded_it(tmp_path):
    regrouped = {**META, "data_parallel": 3, "micro_batch_size": 1}  # 1 x 3 sequences -> 3 x 1
    checkpoint.check_compatible(META, regrouped, tmp_path)
    with pytest.raises(UserError, match="sharded by ZeRO over 1 replicas") as err:
        checkpoint.check_compatible(META, regrouped, tmp_path, sharded_optimizer=True)
    assert "launch 1 replica(s) per stage" in err.value.fix
    with pytest.raises(UserError, match="the global batch differs"):  # 3 x 3 sequences: another batch
        checkpoint.check_compatible(META, {**META, "data_parallel": 3}, tmp_path)


@pytest.mark.parametrize("key,value,problem,fix", [
    ("stages", 4, "the number of stages differs: the run has 2, this launch 4", "--stages 2 to continue the run"),
    ("data_parallel", 2, "the global batch differs", "launch 1 replica(s) per stage"),
    ("seed", 2, "the seed differs: the run has 1, this launch 2", "--seed 1 to continue"),
    ("tokenizer_sha256", "c", "the tokenizer differs from the run's", "--tokenizer and --data the run started with")])
def test_a_different_launch_is_refused_naming_the_flag_that_continues_it(tmp_path, key, value, problem, fix):
    checkpoint.check_compatible(META, dict(META), tmp_path)
    with pytest.raises(UserError) as err:
        checkpoint.check_compatible(META, {**META, key: value}, tmp_path)
    assert problem in err.value.problem and fix in err.value.fix, str(err.value)
    assert f"--init_from {tmp_path}" in err.value.fix

"""bll_ds/pipeline/launched/link_delay.py: a slow link in the point-to-point layer (--link_delay_ms). Two gloo
ranks (tests/link_delay_worker.py): messages arrive no sooner than the delay after they were
sent, in order, with the values they had when sent; the sender is not held up; uninstall gives
torch its functions back. The tests that read the two-rank launch carry the launcher marker."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import REPO, VENV_BIN, cpu_env, run_script

MASTER_PORT = 29821
DELAY_S = 0.2


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = tmp_path_factory.mktemp("link_delay")
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(MASTER_PORT),
           str(REPO / "tests/link_delay_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.launcher
def test_messages_arrive_after_the_delay_in_order_with_their_sent_values(seen):
    receiver = seen[1]
    assert receiver["values"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # Every message was sent right after the barrier, so none can arrive before the delay (less
    # a millisecond for the two ranks leaving the barrier at slightly different times).
    assert min(receiver["arrivals_s"]) >= DELAY_S - 0.001


@pytest.mark.launcher
def test_the_sender_is_not_held_up_by_the_delay(seen):
    # Five sends, each copied and queued: far less than one delay, let alone five.
    assert seen[0]["send_calls_s"] < DELAY_S / 2


@pytest.mark.launcher
def test_install_patches_and_uninstall_restores_torch(seen):
    assert all(rank["patched"] and rank["restored"] for rank in seen)
    assert all(rank["round_trip_after_s"] < DELAY_S for rank in seen)


def test_negative_delay_is_refused():
    from bll_ds.pipeline.launched import link_delay

    with pytest.raises(ValueError, match=">= 0"):
        link_delay.install(-1.0)


def test_the_emulator_refuses_a_link_delay(tmp_path):
    result = run_script(REPO / "scripts/pretrain.py", [
        "--emulate", "--stages", "2", "--model", str(REPO / "models/test-1m.json"),
        "--deepspeed_config", str(REPO / "ds_configs/test-1m.json"), "--tokenizer", "char", "--steps", "2",
        "--link_delay_ms", "5", "--out", str(tmp_path / "run")], timeout=120)
    assert result.returncode != 0
    assert "the emulator has none" in result.stderr and "--latency_us" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_negative_flag_is_a_user_error_naming_it():
    """Checked with every flag's range when the flags are parsed (pretrain.py and peer_pretrain.py)."""
    from bll_ds.infra.errors import UserError
    from bll_ds.run.config import parse_run_config

    base = ["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o"]
    with pytest.raises(UserError, match="--link_delay_ms -1 is out of range: it must be at least 0"):
        parse_run_config(base + ["--link_delay_ms", "-1"])
    assert parse_run_config(base + ["--link_delay_ms", "0"]).link_delay_ms == 0.0

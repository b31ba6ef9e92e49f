"""The time-to-loss projection (bll_bench/time_to_loss.py): where a curve reaches a loss, the
measured token ratio from a sweep's runs, and a projection row from the simulator."""

import json

import pytest

from bll_bench import time_to_loss
from bll_ds.infra.errors import UserError
from bll_ds.run import run_dir as names


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(1, 100, 5.0), (2, 200, 4.0), (3, 300, 3.0)]
    assert time_to_loss.tokens_to_reach(curve, 4.5) == pytest.approx(150.0)
    assert time_to_loss.tokens_to_reach(curve, 5.0) == 100.0
    assert time_to_loss.tokens_to_reach(curve, 2.0) is None


def _run(folder, name, losses, layers=8):
    run = folder / name
    run.mkdir(parents=True)
    lines = [{"step": 10 * (i + 1), "train/tokens_seen": 1000 * (i + 1)} for i in range(len(losses))]
    lines += [{"step": 10 * (i + 1), "val/loss": loss} for i, loss in enumerate(losses)]
    (run / names.METRICS).write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    (run / names.SUMMARY).write_text(json.dumps({"val_loss": losses[-1], "steps": 10 * len(losses)}))
    (run / names.MODEL_CONFIG).write_text(json.dumps({"num_hidden_layers": layers}))


def test_the_measured_ratio_uses_the_periodic_evaluations(tmp_path):
    """The last point (the final evaluation, more batches) is left out of both curves."""
    _run(tmp_path, "bp-L8", [5.0, 4.0, 3.0, 2.9])
    _run(tmp_path, "bll-x-S8", [5.0, 4.5, 3.5, 9.9])
    measured = time_to_loss.measured_ratio(tmp_path, "bll-x-S8")
    assert measured["target_loss"] == 3.5 and measured["bll_tokens"] == 3000
    assert measured["bp_tokens"] == pytest.approx(2500.0)          # 4.0 -> 3.0 between 2000 and 3000 tokens
    assert measured["token_ratio"] == pytest.approx(1.2)
    assert measured["bll_tokens_to_bp_final"] is None               # 3.0 never reached
    with pytest.raises(UserError, match="not a block-local sweep run"):
        time_to_loss.measured_ratio(tmp_path, "bp-L8")


def test_a_projection_row_from_the_simulator(tmp_path, capsys):
    _run(tmp_path, "bp-L8", [5.0, 4.0, 3.0, 2.9])
    _run(tmp_path, "bll-dgl-S8", [5.0, 4.5, 3.5, 9.9])
    assert time_to_loss.main(["--sweep", str(tmp_path), "--run", "bll-dgl-S8", "--model", "models/llama-25m.json",
                              "--micro_batch_factors", "2", "--seq_len", "256", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "time_to_loss.json").read_text())
    (row,) = report["rows"]
    assert row["M"] == 16 and row["time_ratio"] == pytest.approx(1.2 * row["step_ratio"])
    assert "Projection, not a measurement" in capsys.readouterr().out
    assert (tmp_path / "out" / "time_to_loss.png").stat().st_size > 0

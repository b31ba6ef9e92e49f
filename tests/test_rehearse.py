"""Smoke test of the scale rehearsal (bll_bench/rehearse.py) on the tiny spec, in-process.

The real rehearsal (llama-1b, one stage of 8) is run by hand; this checks that every output is
there and that the measured saved activations agree with the planner's prediction for the stage.
glibc's allocator is left alone (malloc_mmap_threshold=0): the test runs inside pytest's process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bll_bench import rehearse
from bll_ds.method.default_variant import DEFAULT_VARIANT


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# test-1m, b=2, T=32: 1/16 MiB of fp32 logits per micro-batch; 0.02 MiB gives 4 slices.
@pytest.mark.parametrize("stage,dtype,max_mb,slices", [(1, "fp32", 16, 1), (0, "fp32", 16, 1), (3, "fp32", 16, 1),
                                                       (1, "bf16", 16, 1), (1, "fp32", 0.02, 4),
                                                       (0, "bf16", 0.02, 4), (3, "fp32", 0.02, 1)])
def test_rehearsal_outputs_agree_with_the_planner(stage, dtype, max_mb, slices):
    result = rehearse.rehearse("models/test-1m.json", stages=4, stage=stage, micro_batch_size=2, seq_len=32,
                               micro_batches=2, steps=3, dtype=dtype, malloc_mmap_threshold=0,
                               readout_max_logits_mb=max_mb)
    assert len(result.step_s) == 3 and result.median_step_s > 0
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.peak_rss_mb >= result.baseline_rss_mb > 0
    assert result.predicted_rss_mb > result.baseline_rss_mb
    assert result.plan["stage"] == stage and result.plan["decoder_layers"] == result.decoder_layers == 1
    assert result.readout_slices == result.plan["readout_slices"] == slices
    # The same meter as the engines, on what the engine runs: the planner's formulas to the byte.
    assert result.saved_micro_batch_bytes == result.predicted_saved_micro_batch_bytes
    assert result.saved_step_bytes == result.predicted_meter_bytes
    assert "planner" in rehearse.format_result(result)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_the_default_variants_rehearsal_agrees_with_the_planner(stage):
    """The default (a critic variant): stage 0 reads through the received critic, stage 1 also
    trains one of its input, the last stage trains one beside the LM loss. At V = 256 the
    2,048 negatives reach the whole vocabulary, so the planner's bound on the candidates is exact."""
    result = rehearse.rehearse("models/test-1m.json", stages=4, stage=stage, micro_batch_size=2, seq_len=32,
                               micro_batches=2, steps=2, malloc_mmap_threshold=0, variant=DEFAULT_VARIANT)
    assert result.saved_micro_batch_bytes == result.predicted_saved_micro_batch_bytes
    assert result.saved_step_bytes == result.predicted_meter_bytes


def test_sliced_rehearsal_trains_as_the_unsliced_one():
    """Same seeds, same data: the sliced readout's losses are the unsliced ones (a sum in another order)."""
    runs = [rehearse.rehearse("models/test-1m.json", stages=4, stage=1, micro_batch_size=2, seq_len=32,
                              micro_batches=2, steps=3, malloc_mmap_threshold=0, readout_max_logits_mb=max_mb)
            for max_mb in (0, 0.02)]
    assert [r.readout_slices for r in runs] == [1, 4]
    assert runs[1].losses == pytest.approx(runs[0].losses, abs=2e-4)
    assert runs[1].saved_micro_batch_bytes < runs[0].saved_micro_batch_bytes


def test_rehearsal_keeps_what_the_engine_keeps():
    """Middle stage: LAG + 1 received tables, outbox payloads, a send window of 2M outputs."""
    config = rehearse.load_model_spec("models/test-1m.json")
    built = rehearse.build_stage(config, 4, 1)
    holdings = rehearse._holdings(config, built, 2, 16, torch.float32)
    optimizer = rehearse._optimizer(built, "fp32")
    generator = torch.Generator().manual_seed(0)
    block_stage = rehearse._block_stage(config, built, optimizer, holdings, 2, torch.float32)
    for step in range(1, 4):
        rehearse._train_step(config, built, block_stage, step, holdings, 2, 16, 2, generator, None)
    assert len(holdings.inbox) == rehearse.memory.INBOX_TABLES
    assert len(holdings.outbox) == rehearse.memory.OUTBOX_TABLES
    assert len(holdings.send_window) == 2 * 2
    assert holdings.receive_buffer.shape == (2, 16, config.hidden_size)


def test_rehearsal_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "rehearsal.json"
    assert rehearse.main(["--model", "models/test-1m.json", "--stages", "2", "--seq_len", "16",
                          "--steps", "2", "--malloc_mmap_threshold", "0", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["stage"] == 0 and saved["stages"] == 2 and len(saved["step_s"]) == 2
    assert "saved, one micro-batch" in capsys.readouterr().out

"""Using a trained run: evaluate, export to transformers (offline), generate. One real 2-stage
block-local run through the launcher (conftest's launched_bll_run) is shared by every test here."""

import json
import math
import subprocess

import pytest
import torch

from bll_ds.data import EvalBatches, Tokenizer, load_corpus, open_stream, prepare_token_streams, token_dtype
from helpers import LAUNCHED_STEPS, REPO, VENV_BIN, cpu_env, launch_failure, run_script

pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def trained_run(launched_bll_run):
    """2 launched block-local stages, 30 steps, the final loss on the whole held-out split
    (conftest's launched_bll_run, shared with tests/test_launcher.py and tests/test_emulator.py)."""
    return launched_bll_run


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    done = _script("export.py", str(trained_run), str(out))
    assert done.returncode == 0, launch_failure(done)
    return out


def _script(name, *args, launcher_ranks=None):
    script = str(REPO / "scripts" / name)
    if launcher_ranks is None:
        return run_script(script, list(args), timeout=300)
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(launcher_ranks), "--master_port", "29652",
           script, *args]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)


def _json_out(done):
    assert done.returncode == 0, launch_failure(done)
    text = done.stdout
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def test_evaluate_reproduces_the_runs_held_out_loss(trained_run, cache_dir):
    summary = json.loads((trained_run / "summary.json").read_text())
    result = _json_out(_script("evaluate.py", str(trained_run), "--cache_dir", str(cache_dir)))
    assert result["step"] == LAUNCHED_STEPS
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["tokens"] > 0 and result["tokens_per_s"] > 0


def test_evaluate_under_the_launcher_splits_batches_and_agrees(trained_run, cache_dir, tmp_path):
    single = _json_out(_script("evaluate.py", str(trained_run), "--cache_dir", str(cache_dir), "--batches", "8"))
    done = _script("evaluate.py", str(trained_run), "--cache_dir", str(cache_dir), "--batches", "8",
                   "--json", str(tmp_path / "eval.json"), launcher_ranks=2)
    assert done.returncode == 0, launch_failure(done)
    two = json.loads((tmp_path / "eval.json").read_text())
    assert two["ranks"] == 2 and two["tokens"] == single["tokens"]
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_residual_norms_are_each_layers_stream_and_update_rms(trained_run, cache_dir):
    """--residual_norms reports one row per decoder layer; checked by hand on one batch."""
    from bll_ds.modeling.layers import DecoderLayer
    from bll_ds.use.trained_run import load_forward_network, residual_norms

    result = _json_out(_script("evaluate.py", str(trained_run), "--cache_dir", str(cache_dir), "--batches", "2",
                               "--residual_norms"))
    _, layers, meta = load_forward_network(trained_run)
    decoder = [i for i, layer in enumerate(layers) if isinstance(layer, DecoderLayer)]
    assert [row["layer"] for row in result["residual_norms"]] == decoder
    batch = (torch.randint(0, 60, (2, meta["seq_len"])), None)
    row = residual_norms(layers, [batch], max_batches=1)[0]
    with torch.no_grad():
        stream = layers[:decoder[0]](batch[0]).float()
        update = layers[decoder[0]](stream) - stream
    assert row["stream_rms"] == pytest.approx(stream.pow(2).mean().sqrt().item(), rel=1e-5)
    assert row["update_over_stream"] == pytest.approx((update.pow(2).mean() / stream.pow(2).mean()).sqrt().item(),
                                                      rel=1e-4)


def test_evaluate_on_another_corpus_uses_the_runs_tokenizer(trained_run, cache_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be, that is the question.\n" * 200)
    result = _json_out(_script("evaluate.py", str(trained_run), "--data", str(other), "--cache_dir", str(cache_dir)))
    assert result["data"] == str(other) and math.isfinite(result["loss"])


# The whole held-out split in this process, with one thread: a two-thread pool on a busy 2-core
# machine waits at every barrier for a descheduled thread (measured here: 209 s, then 15 s).
@pytest.mark.usefixtures("one_thread")
def test_export_loads_offline_in_transformers_with_the_same_loss(trained_run, exported, cache_dir, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"

    # The same held-out windows the run evaluated, through transformers' own model and loss.
    summary = json.loads((trained_run / "summary.json").read_text())
    meta = json.loads((trained_run / "checkpoints" / f"step_{LAUNCHED_STEPS:07d}" / "complete.json").read_text())
    ours = Tokenizer(str(trained_run / "tokenizer.model"))
    streams = prepare_token_streams(load_corpus(meta["data"]), ours, str(cache_dir))
    val = open_stream(streams.val_path, token_dtype(ours.vocab_size))
    losses = [model(input_ids=x, labels=None).logits for x, _ in EvalBatches(val, 64, 4, 10**9)]
    labels = [y for _, y in EvalBatches(val, 64, 4, 10**9)]
    with torch.no_grad():
        loss = torch.stack([torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y.reshape(-1))
                            for lg, y in zip(losses, labels)]).mean().item()
    assert loss == pytest.approx(summary["val_loss"], rel=0.01)  # the bar; measured to ~1e-6

    text = "First Citizen:\n  Before we proceed any further, hear me speak.\n"
    assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    assert tokenizer.decode(ours.encode(text)) == text

    # The forward network only; the feedback block (stage 0 of 2) beside it.
    info = json.loads((exported / "bll_ds_export.json").read_text())
    assert info["method"] == "bll" and info["feedback_files"] == ["bll_feedback/stage0.safetensors"]
    with safe_open(str(exported / "model.safetensors"), "pt") as weights:
        assert not any("feedback" in k or k.startswith("g.") for k in weights.keys())
    with safe_open(str(exported / info["feedback_files"][0]), "pt") as feedback:
        assert any(k.startswith("g.") for k in feedback.keys())


def test_export_refuses_to_overwrite_and_names_a_missing_run(exported, tmp_path):
    done = _script("export.py", str(tmp_path), str(tmp_path / "x"))
    assert done.returncode == 2 and "is not a bll-ds run dir" in done.stderr and "Traceback" not in done.stderr
    done = _script("export.py", str(exported.parent), str(exported))  # exported.parent is no run either
    assert done.returncode == 2


def test_generate_is_seeded_and_the_same_from_run_and_export(trained_run, exported):
    args = ["--prompt", "ROMEO:", "--max_new_tokens", "30", "--seed", "3"]
    from_run = _script("generate.py", str(trained_run), *args)
    from_export = _script("generate.py", str(exported), *args)
    assert from_run.returncode == 0, launch_failure(from_run)
    assert from_run.stdout == from_export.stdout
    assert from_run.stdout.startswith("ROMEO:") and len(from_run.stdout) > len("ROMEO:\n")
    other_seed = _script("generate.py", str(exported), *args[:-1], "4")
    assert other_seed.stdout != from_run.stdout


def test_evaluate_in_bf16_is_fp32_within_rounding(trained_run, cache_dir):
    """--device cpu --dtype bf16 evaluates the bf16-rounded network; the loss itself is taken in
    fp32 (lm_loss upcasts the logits), so it moves by the weights' rounding only."""
    from bll_ds.modeling.layers import lm_loss

    args = [str(trained_run), "--cache_dir", str(cache_dir), "--batches", "4", "--device", "cpu"]
    fp32 = _json_out(_script("evaluate.py", *args))
    bf16 = _json_out(_script("evaluate.py", *args, "--dtype", "bf16"))
    assert (fp32["device"], fp32["dtype"], bf16["dtype"]) == ("cpu", "fp32", "bf16")
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["loss"] != fp32["loss"]  # it did run in bf16
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-3)
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    assert lm_loss(logits, torch.randint(0, 7, (2, 3))).dtype == torch.float32


def test_export_in_bf16_records_its_dtype(trained_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    done = _script("export.py", str(trained_run), str(out), "--dtype", "bf16")
    assert done.returncode == 0, launch_failure(done)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "bll_ds_export.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # transformers' default: config's dtype


def test_generate_on_the_cpu_device(trained_run, exported):
    args = ["--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "3", "--device", "cpu"]
    fp32 = _script("generate.py", str(exported), *args, "--dtype", "fp32")
    bf16 = _script("generate.py", str(trained_run), *args, "--dtype", "bf16")
    for done in (fp32, bf16):
        assert done.returncode == 0, launch_failure(done)
        assert done.stdout.startswith("ROMEO:") and len(done.stdout) > len("ROMEO:\n")
    if not torch.cuda.is_available():  # the default is then this very device and dtype
        default = _script("generate.py", str(exported), *args[:-2])
        assert default.stdout == fp32.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_cuda_without_cuda_is_one_clear_error(trained_run, script):
    done = _script(script, str(trained_run), "--device", "cuda")
    assert done.returncode == 2, launch_failure(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(errors) == 1 and "--device cuda" in errors[0] and "Fix: pass --device cpu" in errors[0], done.stderr
    assert "Traceback" not in done.stderr

"""Use a trained run: rebuild its forward network from a checkpoint, evaluate it, export it as a
Hugging Face model folder, and load its tokenizer for `transformers`.

The forward network is the run's own layers (bll_ds/modeling) loaded from DeepSpeed's per-layer
files (`layer_NN-model_states.pt`, NN = position in the pipeline); its weights carry Hugging Face
names (`to_hf_state_dict`), so the export is a plain `LlamaForCausalLM` / `GPT2LMHeadModel`. A BLL
run's feedback blocks are not part of the forward network: they are exported beside it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.modeling import load_model_spec
from bll_ds.modeling.layers import lm_loss
from bll_ds.modeling.pipeline import build_sequential, to_hf_state_dict
from bll_ds.run import checkpoint
from bll_ds.run.checkpoint import resolve_checkpoint

from bll_ds.run.run_dir import HF_TOKENIZER, MODEL_CONFIG, TOKENIZER_MODEL, checkpoints, layer_weights


def load_forward_network(run_dir: Path, step: int | None = None) -> tuple[object, nn.Sequential, dict]:
    """(model config, the run's layers as one nn.Sequential with the checkpoint's weights, meta)."""
    ckpt, meta = resolve_checkpoint(run_dir, step)
    config = load_model_spec(run_dir / MODEL_CONFIG)
    layers = build_sequential(config, seed=0)
    for index, layer in enumerate(layers):
        path = ckpt / layer_weights(index)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            layer.load_state_dict(state)
        except (OSError, RuntimeError, EOFError) as err:
            raise UserError(f"cannot load {path}: {err}.",
                            "the checkpoint is damaged; pass --step for an earlier complete one.") from err
    return config, layers.eval(), meta


def hf_model(config, layers: nn.Sequential):
    """The same weights in transformers' own model class (LlamaForCausalLM, GPT2LMHeadModel)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(layers), strict=False)
    # Non-persistent buffers (rotary frequencies, causal masks) are rebuilt by the model itself.
    persistent = set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not match transformers: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_tokenizer(run_dir: Path):
    """The run's sentencepiece model as a transformers tokenizer with identical ids: no BOS added,
    no dummy prefix (bll_ds trains its tokenizers without one)."""
    from transformers import LlamaTokenizer

    if (run_dir / HF_TOKENIZER).is_dir():  # the run trained with a Hugging Face tokenizer: it is one already
        from bll_ds.data.hf_tokenizer import transformers_tokenizer
        return transformers_tokenizer(run_dir / HF_TOKENIZER)
    if not (run_dir / TOKENIZER_MODEL).is_file():
        raise UserError(f"{run_dir} holds no tokenizer ({TOKENIZER_MODEL} or {HF_TOKENIZER}/).",
                        "pass the --out folder of a pretrain.py run (with its tokenizer), or an exported model folder.")
    with tempfile.TemporaryDirectory() as scratch:
        # Only the .model file: the run dir's tokenizer.json is bll-ds's fingerprint, not a
        # transformers tokenizer file.
        shutil.copy(run_dir / TOKENIZER_MODEL, Path(scratch) / TOKENIZER_MODEL)
        return LlamaTokenizer.from_pretrained(scratch, add_bos_token=False, add_eos_token=False, legacy=False,
                                              add_prefix_space=False)


def export(run_dir: Path, out_dir: Path, step: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Write a Hugging Face model folder; returns what was written. The folder appears whole or
    not at all (written beside it, then renamed). `dtype`: of the saved weights (default fp32,
    the weights as trained); transformers records it in config.json ("dtype"), and
    from_pretrained loads them in it by default."""
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists.", "choose a new output folder, or remove the old export.")
    config, layers, meta = load_forward_network(run_dir, step)
    model = hf_model(config, layers).to(dtype)
    tokenizer = hf_tokenizer(run_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    feedback = _export_feedback(run_dir, meta, tmp)
    info = {"source_run": str(run_dir.resolve()), "step": meta["step"], "method": meta["method"],
            "bll_variant": meta.get("bll_variant"), "stages": meta["stages"],
            "dtype": str(dtype).removeprefix("torch."), "feedback_files": feedback}
    atomic_write_text(tmp / "bll_ds_export.json", json.dumps(info, indent=2) + "\n")
    tmp.rename(out_dir)
    return info


def _export_feedback(run_dir: Path, meta: dict, out: Path) -> list[str]:
    """BLL runs: each stage's feedback block (its own weights, not part of the forward network) as
    bll_feedback/stage{k}.safetensors."""
    if meta["method"] != "bll":
        return []
    from safetensors.torch import save_file

    ckpt = checkpoints(run_dir) / checkpoint.tag_for(meta["step"])
    written = []
    for path in sorted(ckpt.glob("bll_stage*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["feedback"]
        if not state:
            continue  # the last stage has no feedback block
        (out / "bll_feedback").mkdir(exist_ok=True)
        name = f"bll_feedback/stage{int(path.stem.removeprefix('bll_stage'))}.safetensors"
        # A module's extra state (the -man readouts' fp32 average) is a dict: its tensors under key.sub.
        tensors = {f"{k}.{sub}" if sub else k: t.contiguous()
                   for k, v in state.items() for sub, t in (v.items() if isinstance(v, dict) else [("", v)])
                   if torch.is_tensor(t)}
        save_file(tensors, str(out / name),
                  metadata={"bll_variant": str(meta.get("bll_variant")), "step": str(meta["step"])})
        written.append(name)
    return written


@torch.no_grad()
def evaluate(forward, batches, rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> dict:
    """Mean next-token loss of `forward(ids) -> logits` over this rank's share of `batches`
    (every world-th batch), summed over ranks when a process group exists. `device`: where
    `forward` runs (and, under NCCL, where the totals are reduced). Each batch's loss is taken
    in fp32 (lm_loss upcasts the logits) and summed in float64, whatever the model's dtype."""
    mine = list(batches)[rank::world]
    loss_sum, tokens, start = 0.0, 0, time.perf_counter()
    for inputs, labels in mine:
        labels = labels.to(device)
        loss_sum += lm_loss(forward(inputs.to(device)), labels).item() * labels.numel()
        tokens += labels.numel()
    seconds = time.perf_counter() - start
    totals = torch.tensor([loss_sum, float(tokens), seconds], dtype=torch.float64)
    if world > 1:
        totals = totals.to(device)  # NCCL reduces CUDA tensors only; gloo takes either
        torch.distributed.all_reduce(totals)
        totals[2] /= world
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals[1]),
            "tokens_per_s": totals[1].item() / max(totals[2].item(), 1e-9)}


@torch.no_grad()
def residual_norms(layers: nn.Sequential, batches, max_batches: int = 4,
                   device: torch.device | str = "cpu") -> list[dict]:
    """Per decoder layer: the RMS of the residual stream it reads and of the update it adds, over
    the first `max_batches` batches. A stage whose update dwarfs its input has overwritten, not
    refined, what the earlier stages computed (docs/results/quality.md, the overlap variants)."""
    from bll_ds.modeling.layers import DecoderLayer

    sums: dict[int, list[float]] = {}
    for count, (inputs, _) in enumerate(batches):
        if count == max_batches:
            break
        hidden = inputs.to(device)
        for index, layer in enumerate(layers):
            out = layer(hidden)
            if isinstance(layer, DecoderLayer):
                stream, update = hidden.float(), (out - hidden).float()
                row = sums.setdefault(index, [0.0, 0.0, 0])
                row[0] += stream.pow(2).mean().item()
                row[1] += update.pow(2).mean().item()
                row[2] += 1
            hidden = out
    return [{"layer": index, "stream_rms": math.sqrt(a / n), "update_rms": math.sqrt(b / n),
             "update_over_stream": math.sqrt(b / a) if a > 0 else float("inf")}
            for index, (a, b, n) in sorted(sums.items())]

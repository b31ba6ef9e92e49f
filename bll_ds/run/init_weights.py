"""`--init_from DIR`: start a run from existing weights (weights only: a new optimizer, schedule
and data order).

DIR is either a Hugging Face model folder (config.json + model.safetensors, sharded safetensors
with model.safetensors.index.json, or pytorch_model.bin[.index.json]) or another bll-ds run dir
(its latest complete checkpoint's per-layer files). Its model must be the run's: the same family
and shape, the vocabulary included (a mismatch names the first differing field).

Every stage reads only the tensors of its own layers, by name: pipeline layer i's local keys map
to Hugging Face names through the layer's `hf_key` (bll_ds/modeling/layers.py). A folder that ties
its LM head to the embedding (GPT-2, Llama with tie_word_embeddings) stores the matrix once; the
run's untied head starts as a copy of it.

`load_into(engine, ...)` runs after the engine is built, so it must also set what the optimizer
holds apart from the module: DeepSpeed's bf16 and ZeRO optimizers keep fp32 master copies of the
parameters (flat partitions), and an optimizer step writes those masters back over the module.
Loading the module alone would be undone by the first step; `set_master_weights` (the launched
engine) and the emulator's own masters (bf16 runs) take the loaded values too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bll_ds.infra.errors import UserError
from bll_ds.run.run_dir import MODEL_CONFIG, layer_weights

HF_CONFIG = "config.json"
# Weight files of a Hugging Face folder, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

# Fields that fix the weights' shapes or what the layers compute with them, per family. Shape
# fields alone would let a different rotary base or norm epsilon load silently.
COMMON_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
FAMILY_FIELDS = {
    "llama": ("num_key_value_heads", "intermediate_size", "head_dim", "hidden_act", "rms_norm_eps",
              "rope_parameters", "attention_bias", "mlp_bias"),
    "gpt2": ("n_inner", "n_positions", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
             "scale_attn_by_inverse_layer_idx"),
}
EMBEDDING_KEY = {"llama": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}
HEAD_KEY = "lm_head.weight"


def load_into(engine, source: str, model_config) -> dict:
    """Load `source`'s weights into every layer this process trains: the launched pipeline
    engine's stage, or all stages of the one-process emulator. Call it on a fresh engine, not
    on a resumed one (a resumed run loads its own checkpoint). Returns a summary to log."""
    weights = open_source(Path(source), model_config)
    from bll_ds.pipeline.emulated.emulator import EmulatedPipeline

    if isinstance(engine, EmulatedPipeline):
        loaded = []
        for stage in engine.stages:
            # bf16: the fp32 copies that the stage's torch optimizer updates (fp32: none)
            masters = {} if stage.masters is stage.params else dict(zip(map(id, stage.params), stage.masters))
            for index, layer in zip(stage.layer_index, stage.module.layers):
                for param, value in _load_layer(layer, index, weights):
                    if id(param) in masters:
                        masters[id(param)].data.copy_(value)
                loaded.append(index)
    else:
        from bll_ds.pipeline.launched import deepspeed_internals as ds_internals

        values = []
        pairs = stage_layers(engine.module)
        for index, layer in pairs:
            values += _load_layer(layer, index, weights)
        ds_internals.set_master_weights(engine, values)
        loaded = [index for index, _ in pairs]
    return {**weights.describe(), "layers": loaded, "tensors": weights.tensors_read}


def stage_layers(module) -> list[tuple[int, nn.Module]]:
    """(pipeline position, layer) of every layer a launched stage's PipelineModule built: its
    first layer is the stage's partition start (DeepSpeed numbers its layer files the same way)."""
    start = module.partitions()[module.stage_id]
    return list(enumerate(module.forward_funcs, start))


def _load_layer(layer: nn.Module, index: int, weights) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copy the source's tensors into `layer` in place (parameters may be views into DeepSpeed's
    flat buffers, so they are never replaced); returns (parameter, source value) pairs."""
    state = weights.layer_state(index, layer)
    try:
        with torch.no_grad():
            layer.load_state_dict(state, strict=True)
    except RuntimeError as err:
        why = " ".join(str(err).split())  # torch's message spans lines; the error is one
        raise UserError(f"--init_from {weights.path}: pipeline layer {index} does not take its weights ({why}).",
                        "init from a model of the run's shape (same --model spec).") from err
    return [(param, state[name]) for name, param in layer.named_parameters() if name in state]


def open_source(path: Path, model_config):
    """The source's weights, after checking its model is the run's."""
    if not path.is_dir():
        raise UserError(f"--init_from {path} does not exist (or is not a folder).",
                        "pass a Hugging Face model folder or the --out folder of another run.")
    if (path / HF_CONFIG).is_file():
        return HFFolder(path, model_config)
    if (path / MODEL_CONFIG).is_file():
        return RunWeights(path, model_config)
    raise UserError(f"--init_from {path} is neither a Hugging Face model folder (no {HF_CONFIG}) nor a bll-ds run "
                    f"dir (no {MODEL_CONFIG}).",
                    "pass a folder saved by transformers' save_pretrained (or scripts/export.py), or the --out "
                    "folder of another run.")


def first_difference(theirs, ours) -> tuple[str, object, object] | None:
    """(field, their value, our value) of the first model field that differs, or None."""
    if theirs.model_type != ours.model_type:
        return "model_type", theirs.model_type, ours.model_type
    for name in COMMON_FIELDS + FAMILY_FIELDS.get(ours.model_type, ()):
        a, b = getattr(theirs, name, None), getattr(ours, name, None)
        if a != b:
            return name, a, b
    return None


class HFFolder:
    """A Hugging Face model folder, read tensor by tensor (safetensors) or file by file (.bin)."""

    def __init__(self, path: Path, model_config):
        from transformers import AutoConfig

        from bll_ds.modeling.spec import SUPPORTED_FAMILIES

        self.path, self.tensors_read = path, 0
        raw = json.loads((path / HF_CONFIG).read_text())
        if raw.get("model_type") not in SUPPORTED_FAMILIES:
            raise UserError(f"--init_from {path} holds a {raw.get('model_type')!r} model.",
                            f"init from a model of the run's family ({model_config.model_type}).")
        config = AutoConfig.from_pretrained(path)
        _check_same_model(config, model_config, path,
                          f"train with the folder's model: its {HF_CONFIG} as --model (with "
                          f"\"tie_word_embeddings\": false) and its tokenizer (--tokenizer {path}), or init "
                          f"from a folder of the run's shape.")
        self.family = config.model_type
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self._open: dict[Path, object] = {}
        self.file_of = self._index()

    def _index(self) -> dict[str, Path]:
        """Tensor name -> the file that holds it."""
        for name in HF_WEIGHT_FILES:
            file = self.path / name
            if not file.is_file():
                continue
            if name.endswith(".index.json"):
                weight_map = json.loads(file.read_text())["weight_map"]
                return {key: self.path / shard for key, shard in weight_map.items()}
            return {key: file for key in self._keys(file)}
        raise UserError(f"--init_from {self.path} has a {HF_CONFIG} but no weights "
                        f"(none of {', '.join(HF_WEIGHT_FILES)}).",
                        "save the model with transformers' save_pretrained, which writes model.safetensors.")

    def _keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            return list(self._handle(file).keys())
        return list(self._handle(file))

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == ".safetensors":
                from safetensors import safe_open
                self._open[file] = safe_open(str(file), framework="pt", device="cpu")
            else:
                try:  # memory-mapped: only the tensors read are paged in
                    self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a file in torch's legacy (pre-zip) format cannot be mapped
                    self._open[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self._open[file]

    def _resolve(self, name: str) -> str | None:
        """The file's name for HF key `name`: as transformers writes it, without the base model's
        prefix (original GPT-2 files have `h.0...`), or a tied head's embedding."""
        candidates = [name, name.split(".", 1)[1] if name.startswith(("model.", "transformer.")) else None]
        if name == HEAD_KEY and self.tied:
            embedding = EMBEDDING_KEY[self.family]
            candidates += [embedding, embedding.split(".", 1)[1]]
        return next((c for c in candidates if c in self.file_of), None)

    def tensor(self, name: str) -> torch.Tensor | None:
        key = self._resolve(name)
        if key is None:
            return None
        handle = self._handle(self.file_of[key])
        self.tensors_read += 1
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def layer_state(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        state = {}
        for local in layer.state_dict():
            value = self.tensor(layer.hf_key(local))
            if value is None:
                raise UserError(f"--init_from {self.path} has no tensor {layer.hf_key(local)} "
                                f"(pipeline layer {index}).",
                                f"the folder's weights do not match its {HF_CONFIG}; re-save the model with "
                                f"transformers' save_pretrained.")
            state[local] = value
        return state

    def describe(self) -> dict:
        return {"source": str(self.path.resolve()), "kind": "huggingface", "tied_embeddings": self.tied}


class RunWeights:
    """Another bll-ds run's latest complete checkpoint: one DeepSpeed file per pipeline layer,
    numbered as this run numbers its layers whatever the two runs' stage counts."""

    def __init__(self, path: Path, model_config):
        from bll_ds.modeling import load_model_spec
        from bll_ds.run.checkpoint import resolve_checkpoint

        self.path, self.tensors_read = path, 0
        self.checkpoint, self.meta = resolve_checkpoint(path)
        _check_same_model(load_model_spec(path / MODEL_CONFIG), model_config, path,
                          f"train the same model as the source run: --model with its spec and --tokenizer "
                          f"{path / 'tokenizer.model'} (the vocabulary follows the tokenizer).")

    def layer_state(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        file = self.checkpoint / layer_weights(index)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise UserError(f"--init_from: cannot read {file}: {err}.",
                            "the source run's latest checkpoint is damaged; init from an intact run.") from err
        self.tensors_read += len(state)
        return state

    def describe(self) -> dict:
        return {"source": str(self.path.resolve()), "kind": "run", "step": self.meta["step"],
                "method": self.meta.get("method")}


def _check_same_model(theirs, ours, path: Path, fix: str) -> None:
    diff = first_difference(theirs, ours)
    if diff is not None:
        name, a, b = diff
        raise UserError(f"--init_from {path} is a different model: its {name} is {a!r}, the run's is {b!r}.", fix)

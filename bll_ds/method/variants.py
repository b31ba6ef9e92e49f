"""The registry of block-local variants: one class per local loss, looked up by its name.

A variant is a feedback block class (a subclass of `bll_ds.method.feedback.StageFeedback`) that
declares its own facts as class attributes and class methods: whether it sends a target table
upstream, whether its readout is per token (and so can run in sequence slices), what it adds in
FLOPs and bytes per token, per micro-batch and per step. `get(spec)` returns a `Variant`: the class,
the options written after its name (variant_options.py) and, for the composed variants, the layer
the readout reads through (aux_readout.py, overlap.py). `--bll_variant`'s choices, the engine
builder, the memory planner and the FLOPs model all ask the Variant; none of them lists variants.
A built block holds its options (`block.options`) and its Variant (`block.variant`).

Adding a variant is one class in one file (tests/test_variant_registry.py trains exactly this
one through the launcher and the emulator):

    @register
    class MyFeedback(StageFeedback):
        name = "mine"
        per_token_readout = True  # its loss is a token mean: the engine may run it in slices

        def __init__(self, config, options):  # options: this block's VariantOptions (none used here)
            super().__init__(config, options)
            self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def local_loss(self, hidden, labels):
            logits = self.head(self.norm(hidden)).float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            return ce, {"ce": ce.detach()}

Cost declarations (readout_flops_per_token and the rest in StageFeedback, each a class method
taking the options first) are optional: without
them the run trains and writes its summary with the FLOP rates null, saying so in one line, and
the simulator and the memory planner say "not modelled" for the variant.

The built-in variants live in bll_ds/method/feedback.py, aux_readout.py, overlap.py and context.py;
a variant defined elsewhere is made known to the trainer with `--custom_import path/to/file.py`
(or a module name), which imports the file before the flags are parsed (tests/test_variant_registry.py
does that through the launcher).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bll_ds.method.variant_options import TABLE_DTYPES, VariantOptions, parse_spec

_BUILT_IN = ("bll_ds.method.feedback", "bll_ds.method.aux_readout", "bll_ds.method.overlap", "bll_ds.method.context",
             "bll_ds.method.next_layer_average", "bll_ds.method.critic", "bll_ds.method.direct")


@dataclass(frozen=True)
class Variant:
    """A local loss as a run uses it: the feedback block class, its options, and the layer its
    readout reads h_k through (None, or a class such as aux_readout.AuxiliaryLayer). The block's
    cost declarations are class methods that take the options first; the Variant passes its own
    and adds the readout layer's share, so this is the one place where a composition's facts are
    put together."""

    registered_name: str
    block: type
    readout_layer: type | None = None
    options: VariantOptions = field(default_factory=VariantOptions)

    # -- what the variant is --
    @property
    def name(self) -> str:
        """The canonical spec: "dgl-context:dim=64:neg=2048", options in declaration order."""
        return self.registered_name + self.options.suffix()

    @property
    def sends_table(self) -> bool:
        return self.block.sends_table

    @property
    def per_token_readout(self) -> bool:
        """Whether the loss is a token mean of per-token terms of h_k, and so can be sliced."""
        return self.readout_layer is None and self.block.sliceable(self.options)

    @property
    def trains_input_critic(self) -> bool:
        """Every stage but the first trains a critic of its input, which is its message (critic.py)."""
        return self.block.trains_input_critic

    def message_source(self, stage: int, stages: int) -> int | None:
        """The stage whose messages stage `stage` receives, for a variant that sends any (None: the
        last stage, which receives none): the next stage, or the last one for direct feedback."""
        if stage == stages - 1:
            return None
        return stages - 1 if self.block.tables_from_last_stage else stage + 1

    def message_destinations(self, stage: int, stages: int) -> list[int]:
        """The stages that receive stage `stage`'s messages (message_source's inverse)."""
        return [k for k in range(stages) if self.message_source(k, stages) == stage]

    def holds_block(self, stage: int, stages: int) -> bool:
        """Whether stage `stage` of `stages` holds a feedback block: every stage but the last, and
        the last too where it trains a critic of its input."""
        return stage < stages - 1 or self.trains_input_critic

    @property
    def layer_carries_message(self) -> bool:
        """The readout layer travels in the message after the table (overlap.py, next_layer_average.py)."""
        return self.readout_layer is not None and self.readout_layer.carries_message

    def accepted_options(self) -> frozenset[str]:
        if self.readout_layer is None:
            return self.block.accepted_options()
        layer = self.readout_layer
        return (self.block.accepted_options() - layer.excluded_options) | getattr(layer, "added_options", frozenset())

    def with_options(self, options: VariantOptions) -> "Variant":
        unsupported = [key for key in options.set_names() if key not in self.accepted_options()]
        if unsupported:
            raise ValueError(f"BLL variant {self.registered_name!r} does not take the option(s) {unsupported}; it "
                             f"takes {sorted(self.accepted_options()) or 'none'} (bll_ds/method/variant_options.py)")
        return replace(self, options=options)  # keeps a registered Variant subclass's own rules

    # -- building the block and its messages --
    def build(self, config, input_critic: bool = False, last: bool = False):
        """The block for one stage (its parameters in this order: the block's, the readout layer's,
        then the critic of the stage's input where `input_critic`). `last`: the last stage's,
        which has no local readout (block.last_stage_block; Variant.holds_block)."""
        if last:
            block = self.block.last_stage_block(config, self.options)
            block.variant = self
            return block
        block = self.block(config, self.options)
        if self.readout_layer is not None:
            block.aux = self.readout_layer.build(config, self.options)
        if input_critic:
            block.attach_input_critic()
        block.variant = self
        return block

    def table_refresh(self) -> int:
        """Steps between messages sent upstream (refresh=k; feedback_channel.py's lag rule)."""
        return self.options.refresh

    def message_dtype(self, default: torch.dtype) -> torch.dtype:
        """The dtype the message travels and is held in (table=..., else the model's `default`)."""
        return TABLE_DTYPES.get(self.options.table, default)

    def message_shape(self, config) -> tuple[int, ...] | None:
        """The one tensor stage k+1 sends to stage k once per optimizer step (None: nothing):
        the block's table, then what the readout layer carries (flattened)."""
        table = self.block.message_shape(self.options, config)
        if not self.layer_carries_message:
            return table
        return (math.prod(table or (0,)) + self.readout_layer.message_entries(config),)

    def compose_message(self, table: torch.Tensor | None, stage_layers) -> torch.Tensor | None:
        """Built on the sending stage k+1 after its optimizer step from its table (m_{k+1}, or
        W_out on the last stage) and its forward layers; `receive` on stage k takes it apart. It
        travels in the declared dtype (table=), else in the dtype it was built in."""
        message = self.block.compose_message(self.options, table, stage_layers)
        if self.layer_carries_message:
            parts = self.readout_layer.compose(stage_layers)
            parts = ([message.detach().reshape(-1)] if message is not None else []) + parts
            message = torch.cat([part.to(parts[-1].dtype) for part in parts])
        dtype = TABLE_DTYPES.get(self.options.table)
        return message if message is None or dtype is None else message.to(dtype)

    def receive(self, block, message: torch.Tensor | None) -> None:
        """Stage k at the start of a step: the readout layer takes its share of the message, the
        block (`prepare`) the table."""
        if self.layer_carries_message:
            if message is None:
                raise RuntimeError(f"{self.name} needs the downstream stage's message before its local loss")
            table_shape = self.block.message_shape(self.options, block.config)
            message = self.readout_layer.load(block.aux, message, table_shape)
        block.prepare(message)

    # -- costs (None where the block declares none: "not modelled") --
    def readout_width(self, config) -> int:
        return self.block.readout_width(self.options, config)

    def readout_candidates(self, config, micro_batch_tokens: int | None = None) -> int:
        return self.block.readout_candidates(self.options, config, micro_batch_tokens)

    def readout_flops_per_token(self, config, micro_batch_tokens: int | None = None) -> float | None:
        flops = self.block.readout_flops_per_token(self.options, config, micro_batch_tokens)
        if flops is None or self.readout_layer is None:
            return flops
        return flops + self.readout_layer.flops_per_token(config)

    def readout_flops_per_micro_batch(self, config) -> float:
        return self.block.readout_flops_per_micro_batch(self.options, config)

    def step_flops(self, config) -> float:
        return self.block.step_flops(self.options, config)

    def held_messages(self) -> int:
        return self.block.held_messages(self.options)

    def input_critic_flops_per_token(self, config) -> float:
        """The critic's, plus, where it reads through the stage's first layer (critic_features),
        that layer's forward again."""
        flops = self.block.input_critic_flops_per_token(self.options, config)
        if flops and self.layer_carries_message:
            from bll_ds.measure.flops import layer_forward_flops

            flops += layer_forward_flops(config, config.max_position_embeddings)
        return flops

    def input_critic_parameters(self, config) -> int:
        """Weights of the critic a stage (not the first) trains on its input, or none."""
        return self.block.input_critic_parameters(self.options, config) if self.trains_input_critic else 0

    def critic_features(self, inputs: torch.Tensor, stage_layers) -> torch.Tensor:
        """What a stage's critic reads: its input h_k, or, where the upstream readout reads h_k
        through a copy of this stage's first decoder layer (-man), that layer's output, which the
        copy stands for. Data to the critic: computed without a graph."""
        if not self.layer_carries_message:
            return inputs
        from bll_ds.method.overlap import first_decoder_layer

        with torch.no_grad():
            return first_decoder_layer(stage_layers)(inputs)

    def trainable_matrix_parameters(self, config) -> int:
        """Trainable weights of rank >= 2 (biases and norm gains, well under 1%, left out), counted
        on the meta device: what the optimizer-step cost model charges the block."""
        with torch.device("meta"):
            block = self.build(config)
        return sum(p.numel() for p in block.parameters() if p.requires_grad and p.dim() >= 2)

    def table_bytes_per_step(self, config, dtype_bytes: int) -> float:
        """Bytes sent upstream per optimizer step (the message, or nothing), in the training
        dtype's `dtype_bytes` unless table= sets its own; averaged over the refresh period."""
        shape = self.message_shape(config)
        if shape is None:
            return 0
        dtype = TABLE_DTYPES.get(self.options.table)
        element = dtype.itemsize if dtype is not None else dtype_bytes
        return math.prod(shape) * element / self.table_refresh()

    def readout_saved_bytes_per_token(self, config, dtype_bytes: int, norm_saved_bytes: int,
                                      micro_batch_tokens: int | None = None) -> int | None:
        if self.readout_layer is not None:
            return None  # the layer's activations depend on the sequence length: not modelled
        return self.block.readout_saved_bytes_per_token(self.options, config, dtype_bytes, norm_saved_bytes,
                                                        micro_batch_tokens)

    def readout_saved_bytes_per_micro_batch(self, config, dtype_bytes: int, micro_batch_tokens: int) -> int:
        return self.block.readout_saved_bytes_per_micro_batch(self.options, config, dtype_bytes, micro_batch_tokens)

    def input_critic_saved_bytes(self, config, dtype_bytes: int, norm_saved_bytes: int, micro_batch_tokens: int,
                                 last: bool) -> int:
        """Saved bytes of one micro-batch's critic of the stage's input (0 where the variant trains
        none); the critic is never sliced. `norm_saved_bytes`: its norm's, per token, beyond the
        input; `last`: the last stage's critic."""
        per_token = self.block.input_critic_saved_bytes_per_token(self.options, config, dtype_bytes, norm_saved_bytes,
                                                                  micro_batch_tokens)
        return (micro_batch_tokens * per_token
                + self.block.input_critic_saved_bytes_per_micro_batch(self.options, config, dtype_bytes,
                                                                      micro_batch_tokens, last))


_REGISTRY: dict[str, Variant] = {}


def register(cls: type) -> type:
    """Class decorator: make `cls` available as `--bll_variant cls.name`."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered as a BLL variant")
    _add(Variant(name, cls))
    return cls


def register_composed(name: str, block: type, readout_layer: type) -> None:
    """Make `name` the variant whose readout (that of `block`) reads through `readout_layer`."""
    _add(Variant(name, block, readout_layer))


def _add(variant: Variant) -> None:
    existing = _REGISTRY.get(variant.registered_name)
    if existing is not None:
        if (existing.block.__qualname__, existing.readout_layer) != (variant.block.__qualname__, variant.readout_layer):
            raise ValueError(f"BLL variant {variant.registered_name!r} is already registered by "
                             f"{existing.block.__module__}.{existing.block.__qualname__}")
        return  # the same file imported twice (say as a test module and by --custom_import)
    _REGISTRY[variant.registered_name] = variant


def _import_built_ins() -> None:
    for module in _BUILT_IN:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Every registered variant, built-ins first in their definition order (without options)."""
    _import_built_ins()
    return tuple(_REGISTRY)


def get(spec: str) -> Variant:
    """The Variant of `spec`: a registered name, optionally followed by options
    (bll_ds/method/variant_options.py: "dgl-context:dim=64:neg=2048")."""
    _import_built_ins()
    name, options = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown BLL variant {name!r}; choose one of {tuple(_REGISTRY)} "
                         f"(a variant of your own: --custom_import FILE.py)")
    return _REGISTRY[name].with_options(options)


def argparse_type(spec: str) -> str:
    """`type=` for a command-line flag that takes a variant spec: a clear error, not a traceback."""
    import argparse

    try:
        get(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def is_known(spec: str) -> bool:
    try:
        get(spec)
    except ValueError:
        return False
    return True


def import_custom(spec: str) -> None:
    """Import a module that registers variants: a .py path or a dotted module name. A file's
    folder goes on sys.path first, as for a script, so that it can import its neighbours."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise FileNotFoundError(f"no such file {spec}")
        module_name = f"bll_ds_custom_{path.stem}"
        if module_name in sys.modules:
            return
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    else:
        importlib.import_module(spec)

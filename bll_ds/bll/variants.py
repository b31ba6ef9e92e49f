"""The registry of block-local variants: one class per local loss, looked up by its name.

A variant is a feedback block class (a subclass of `bll_ds.bll.feedback.StageFeedback`) that
declares its own facts as class attributes and class methods: whether it sends a target table
upstream, whether its readout is per token (and so can run in sequence slices), what it adds in
FLOPs and bytes per token, per micro-batch and per step. `--bll_variant`'s choices, the engine
builder, the memory planner and the FLOPs model all ask the class; none of them lists variants.

Adding a variant is one class in one file (tests/test_variant_registry.py trains exactly this
one through the launcher and the emulator):

    @register
    class MyFeedback(StageFeedback):
        name = "mine"
        per_token_readout = True  # its loss is a token mean: the engine may run it in slices

        def __init__(self, config):
            super().__init__(config)
            self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def local_loss(self, hidden, labels):
            logits = self.head(self.norm(hidden)).float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            return ce, {"ce": ce.detach()}

Cost declarations (readout_flops_per_token and the rest in StageFeedback) are optional: without
them the run trains and writes its summary with the FLOP rates null, saying so in one line, and
the simulator and the memory planner say "not modelled" for the variant.

The built-in variants live in bll_ds/bll/feedback.py, aux_readout.py, overlap.py and context.py;
a variant defined elsewhere is made known to the trainer with `--custom_import path/to/file.py`
(or a module name), which imports the file before the flags are parsed (tests/test_variant_registry.py
does that through the launcher).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from bll_ds.bll.variant_options import parse_spec

_REGISTRY: dict[str, type] = {}
_SPECIALISED: dict[str, type] = {}  # "name:key=value..." -> its subclass, built once
_BUILT_IN = ("bll_ds.bll.feedback", "bll_ds.bll.aux_readout", "bll_ds.bll.overlap", "bll_ds.bll.context")


def register(cls: type) -> type:
    """Class decorator: make `cls` available as `--bll_variant cls.name`."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered as a BLL variant")
    existing = _REGISTRY.get(name)
    if existing is not None:
        if existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"BLL variant {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
        return existing  # the same file imported twice (say as a test module and by --custom_import)
    _REGISTRY[name] = cls
    return cls


def _import_built_ins() -> None:
    for module in _BUILT_IN:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Every registered variant, built-ins first in their definition order (without options)."""
    _import_built_ins()
    return tuple(_REGISTRY)


def get(spec: str) -> type:
    """The variant class of `spec`: a registered name, optionally followed by options
    (bll_ds/bll/variant_options.py: "dgl-context:dim=64:neg=2048"). With options, a subclass whose
    `variant_options` hold them, so that every cost the class declares is the run's."""
    _import_built_ins()
    name, options = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown BLL variant {name!r}; choose one of {tuple(_REGISTRY)} "
                         f"(a variant of your own: --custom_import FILE.py)")
    base = _REGISTRY[name]
    if not options.set_names():
        return base
    canonical = name + options.suffix()
    if canonical not in _SPECIALISED:
        unsupported = [key for key in options.set_names() if key not in base.accepted_options()]
        if unsupported:
            raise ValueError(f"BLL variant {name!r} does not take the option(s) {unsupported}; it takes "
                             f"{sorted(base.accepted_options()) or 'none'} (bll_ds/bll/variant_options.py)")
        attributes = {"name": canonical, "variant_options": options, **base.option_attributes(options)}
        _SPECIALISED[canonical] = type(f"{base.__name__}[{options.suffix()[1:]}]", (base,), attributes)
    return _SPECIALISED[canonical]


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

"""The one DeepSpeed boundary (bll_ds/pipeline/launched/deepspeed_internals.py): a DeepSpeed without a member
the code uses is refused at engine build time, naming the member and the pinned version; and no
other module reaches into DeepSpeed's private members."""

import re
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import pytest
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from bll_ds.infra.errors import UserError
from bll_ds.pipeline.launched import deepspeed_internals as ds_internals

PACKAGE = Path(__file__).resolve().parents[1] / "bll_ds"


def test_the_pinned_deepspeed_has_every_member():
    assert deepspeed.__version__ == ds_internals.PINNED_VERSION
    ds_internals.check_deepspeed()


def test_a_missing_method_is_named_with_the_pinned_version(monkeypatch):
    monkeypatch.delattr(PipelineEngine, "_exec_send_grads")
    with pytest.raises(UserError) as err:
        ds_internals.check_deepspeed()
    assert "PipelineEngine._exec_send_grads" in err.value.problem
    assert "deepspeed==0.19.8" in err.value.fix


def test_a_missing_schedule_instruction_is_named(monkeypatch):
    monkeypatch.delattr(schedule, "ReduceGrads")
    with pytest.raises(UserError, match=r"deepspeed\.runtime\.pipe\.schedule\.ReduceGrads"):
        ds_internals.check_deepspeed()


def test_an_engine_without_an_attribute_is_named():
    engine = SimpleNamespace(**{name: None for name in ds_internals.INSTANCE_MEMBERS if name != "pipe_buffers"})
    with pytest.raises(UserError, match="instance attribute pipe_buffers"):
        ds_internals.check_engine(engine)


def test_the_build_runs_the_check_first(monkeypatch):
    """build_engine stops before it touches the module or any process group."""
    from bll_ds.pipeline import build

    monkeypatch.delattr(PipelineEngine, "_send_tensor_meta")
    with pytest.raises(UserError, match="_send_tensor_meta"):
        build.build_engine("bll", module=None, ds_config={})


# Private DeepSpeed members and unbound stock handlers, as they would be written elsewhere.
PRIVATE_USE = re.compile(r"\bPipelineEngine\._|\bDeepSpeedEngine\.|\._exec_\w+|_send_tensor_meta|_step_applied|"
                         r"_configure_python_gc|(?<!ds_internals)\.pipe_buffers\b|first_output_send|tput_timer|"
                         r"\.total_loss\b|DeepSpeedConfig\(|set_optimizer_flags")


def test_no_other_module_reaches_into_deepspeed():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "deepspeed_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if PRIVATE_USE.search(code) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

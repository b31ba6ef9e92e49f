"""Pipeline engines on top of DeepSpeed: the 1F1B backprop baseline with p2p accounting."""

from bll_ds.engine.accounting import StageAccounting
from bll_ds.engine.build import build_engine
from bll_ds.engine.pipeline_engine import AccountedPipelineEngine

__all__ = ["StageAccounting", "build_engine", "AccountedPipelineEngine"]

"""Pipeline engines on top of DeepSpeed: the 1F1B backprop baseline with p2p accounting."""

from bll_ds.pipeline.accounting import StageAccounting
from bll_ds.pipeline.build import build_engine
from bll_ds.pipeline.launched.pipeline_engine import AccountedPipelineEngine

__all__ = ["StageAccounting", "build_engine", "AccountedPipelineEngine"]

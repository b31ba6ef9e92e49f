"""bll-ds: block-local learning for LLM pretraining on DeepSpeed pipeline parallelism."""

__version__ = "0.1.0"

"""Block-local learning: the variant registry (variants.py), message families and their agreement
losses (messages.py), the feedback network (feedback.py) and one stage's step (stage_step.py)."""

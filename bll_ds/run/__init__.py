"""How a run is driven: its config, the training loop (train.py), its run dir, checkpoints,
resume and job control."""

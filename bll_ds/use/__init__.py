"""How a trained run is used: rebuild it from a checkpoint, evaluate, export, generate."""

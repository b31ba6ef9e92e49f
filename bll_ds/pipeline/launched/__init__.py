"""A stage launched as one rank of a DeepSpeed pipeline: the engines, their instruction
schedule, the DeepSpeed members they use, and the simulated slow link."""

"""Benchmarks of block-local learning against pipeline backprop.

- `compare` (python -m bll_bench compare): interleaved launcher runs, bench.json, tables, plots.
- `simulate`: discrete-event pipeline-schedule simulator (GPipe, 1F1B, interleaved, ZB-H1, BLL).
- `memory`: per-stage memory planner (parameters, gradients, ZeRO-1 optimizer state, activations).
- `flops`: model FLOPs per stage and per token.
"""

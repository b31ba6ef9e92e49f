"""Projected time to an equal held-out loss: block-local learning against balanced ZB-H1.

    python -m bll_bench time-to-loss --sweep results/testbed-kernel-char --run bll-dgl-context-man-S8 \\
        --model models/llama-1b.json --model models/llama-7b.json --out docs/projections/time-to-loss

A projection, not a measurement. It multiplies two measured ratios from a sweep's held-out curves
with one simulated ratio at another model's shape:

    L*        the loss compared: the BLL run's held-out loss at its last periodic evaluation
              (the sweeps' periodic evaluations score the same batches at the same steps in
              every run; the final evaluation uses more batches, so it is left out)
    tokens    T_BLL / T_BP: the tokens the BLL run took to reach L* over the tokens backprop on
              the same model took (its curve, linear between evaluations)
    step      the simulator's step time (bll_bench/simulate.py, from model FLOPs) of the fastest
              block-local schedule over balanced ZB-H1's, at the run's S and M = factor x S
    time      tokens x step: below 1, block-local learning reaches L* sooner

The token ratio is taken at the sweep's scale (a character-level model) and assumed to carry over
to the projected shape: that assumption is the projection's weakest part, and the table says so.
Whether the BLL run reaches backprop's own final loss at all is reported beside it (the issue's
"time to backprop's final loss": unbounded where it never does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bll_bench import sweep
from bll_bench.plotting import pyplot
from bll_bench.simulate import BALANCED, REFERENCE_ARM, project, projection_setup, stage_costs
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.infra.errors import UserError
from bll_ds.method import variants
from bll_ds.modeling import load_model_spec
from bll_ds.run import run_dir as names

BLL_ARMS = ("bll", "bll-noflush", "bll-noflush" + BALANCED)


def tokens_to_reach(curve: list[tuple[int, int, float]], target: float) -> float | None:
    """The tokens at which a (step, tokens, loss) curve first reaches `target`, linear between
    evaluations; None if it never does."""
    previous = None
    for _, tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def measured_ratio(sweep_dir: Path, run: str) -> dict:
    """L*, the BLL run's and backprop's tokens to it, and whether the run reaches backprop's final loss."""
    parsed = sweep.parse_run_name(run)
    if parsed is None or "stages" not in parsed:
        raise UserError(f"--run {run!r} is not a block-local sweep run (bll-VARIANT-S{{S}}).",
                        f"pick one of the bll-* folders in {sweep_dir}.")
    config_path = sweep_dir / run / names.MODEL_CONFIG
    if not config_path.is_file():
        raise UserError(f"{sweep_dir / run} holds no {names.MODEL_CONFIG}.", "point --sweep at the folder the sweep wrote.")
    layers = sweep._layers(config_path.resolve())
    baseline = sweep.baseline_name(layers, parsed["seed"], lambda n: (sweep_dir / n).is_dir())
    for folder in (run, baseline):
        if not (sweep_dir / folder / names.SUMMARY).is_file():
            raise UserError(f"{sweep_dir / folder} has not finished (no {names.SUMMARY}).",
                            "finish it with the sweep's command, then project.")
    # The periodic evaluations only: both runs score the same held-out batches at the same steps.
    # The final evaluation (the last point) uses more batches, and so another estimate.
    bll_curve, bp_curve = sweep.val_curve(sweep_dir / run)[:-1], sweep.val_curve(sweep_dir / baseline)[:-1]
    target, bll_tokens = bll_curve[-1][2], bll_curve[-1][1]
    bp_tokens = tokens_to_reach(bp_curve, target)
    reaches_bp = tokens_to_reach(bll_curve, bp_curve[-1][2])
    return {"run": run, "baseline": baseline, "stages": parsed["stages"], "variant": parsed["variant"],
            "target_loss": target, "bll_tokens": bll_tokens, "bp_tokens": bp_tokens,
            "token_ratio": bll_tokens / bp_tokens if bp_tokens else None,
            "bp_final_loss": bp_curve[-1][2], "bll_tokens_to_bp_final": reaches_bp}


def step_ratios(model: str, variant: str, stages: int, factors: list[int], args) -> list[dict]:
    """Per M = factor x S: the fastest block-local arm's step time over balanced ZB-H1's."""
    config = load_model_spec(model)
    layer, link, tokens = projection_setup(config, variant, args)
    rows = project(lambda s, method, balanced=False: stage_costs(layer, config.num_hidden_layers, s, method, balanced),
                   link, tokens, [stages], factors, arms=(REFERENCE_ARM, *BLL_ARMS))
    result = []
    for factor in factors:
        at = {r["schedule"]: r for r in rows if r["M"] == factor * stages}
        best = min(BLL_ARMS, key=lambda arm: at[arm]["step_s"])
        result.append({"model": Path(model).stem, "M": factor * stages, "bll_arm": best,
                       "step_ratio": at[best]["step_s"] / at[REFERENCE_ARM]["step_s"]})
    return result


def markdown(measured: dict, rows: list[dict]) -> str:
    reach = measured["bll_tokens_to_bp_final"]
    lines = [f"Projection, not a measurement. {measured['run']} (S = {measured['stages']}) against "
             f"{measured['baseline']}: L* = {measured['target_loss']:.4f} (the BLL run's held-out loss at its "
             f"last periodic evaluation); "
             f"backprop reached it after {measured['bp_tokens'] / 1e6:.2f}M tokens, the BLL run after "
             f"{measured['bll_tokens'] / 1e6:.2f}M (token ratio {measured['token_ratio']:.3f}, measured at the "
             f"sweep's scale and assumed to carry over). Backprop's own loss at that evaluation "
             f"({measured['bp_final_loss']:.4f}): " + ("not reached by the BLL run within its budget."
                                                       if reach is None else f"reached after {reach / 1e6:.2f}M tokens."),
             "", "| model shape | M | fastest BLL schedule | step time / ZB-H1 balanced | time to L* / ZB-H1 balanced |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['M']} | {r['bll_arm']} | {r['step_ratio']:.3f} | {r['time_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\nM={r['M']}" for r in rows]
    ax.bar(range(len(rows)), [r["time_ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("projected time to L*, BLL / ZB-H1 balanced")
    ax.set_title(title + " (projection)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_bench time-to-loss", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--sweep", required=True, type=Path, help="a sweep folder (bll_bench sweep --out)")
    p.add_argument("--run", required=True, help="the block-local run in it, e.g. bll-dgl-context-man-S8")
    p.add_argument("--model", action="append", required=True, help="a model shape to project to (repeatable)")
    p.add_argument("--variant", default=None, help="the variant's costs in the simulator (default: the run's)")
    p.add_argument("--micro_batch_factors", type=int, nargs="+", default=[2, 4], help="M / S values")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence at the projected shape")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--achieved_tflops", type=float, default=400.0, help="achieved TFLOP/s per device")
    p.add_argument("--memory_gbps", type=float, default=2000.0, help="achieved memory bandwidth, GB/s")
    p.add_argument("--latency_us", type=float, default=10.0, help="link latency per message, microseconds")
    p.add_argument("--bandwidth_gbps", type=float, default=25.0, help="link bandwidth, GB/s")
    p.add_argument("--dtype_bytes", type=int, default=2, help="bytes per activation / table element")
    p.add_argument("--out", required=True, type=Path, help="output folder: time_to_loss.md, .json, .png")
    args = p.parse_args(argv)
    measured = measured_ratio(args.sweep, args.run)
    if measured["token_ratio"] is None:
        raise UserError(f"backprop never reached the run's final loss {measured['target_loss']:.4f}.",
                        "project a run that ends above backprop's curve.")
    variant = args.variant or measured["variant"]
    if not variants.is_known(variant):
        raise UserError(f"{variant!r} is not a registered variant.", "give its spec with --variant.")
    rows = []
    for model in args.model:
        for row in step_ratios(model, variant, measured["stages"], args.micro_batch_factors, args):
            rows.append({**row, "time_ratio": measured["token_ratio"] * row["step_ratio"]})
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"measured": measured, "variant": variant, "rows": rows,
              "args": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_text(args.out / "time_to_loss.json", json.dumps(report, indent=2) + "\n")
    table = markdown(measured, rows)
    atomic_write_text(args.out / "time_to_loss.md", table)
    plot(rows, args.out / "time_to_loss.png", f"{args.run}: time to its final loss")
    print(table, end="")
    return 0

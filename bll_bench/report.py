"""bench.md: the tables of a `compare` benchmark, medians with (min-max) over repeats."""

from __future__ import annotations


def _num(x, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _spread(s: dict | None, fmt: str = ",.0f") -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return _num(s["median"], fmt)
    return f"{_num(s['median'], fmt)} ({_num(s['min'], fmt)}-{_num(s['max'], fmt)})"


def _delay(row: dict) -> str:
    return f"{row.get('link_delay_ms', 0.0):g}"


def _stages(values, fmt: str) -> str:
    return " / ".join(_num(v, fmt) for v in values) if values else "-"


# The two MFU columns, each shown where some run has its figure: over the device's datasheet
# dense peak (as PaLM, Megatron-LM and torchtitan report MFU; null on CPUs), and over the matmul
# peak the run measured.
MFU_COLUMNS = (("mfu", "MFU per stage"), ("mfu_measured_peak", "MFU vs measured peak per stage"))


def _mfu_columns(groups: list[dict]) -> list[tuple[str, str]]:
    return [(key, title) for key, title in MFU_COLUMNS
            if any(v is not None for g in groups for v in (g.get(key) or []))]


def markdown(result: dict) -> str:
    cfg = result["config"]
    mfu = _mfu_columns(result["groups"])
    notes = {"mfu": "`MFU` is model FLOP/s over the device's datasheet dense peak in the run's dtype, as "
                    "published MFU figures state it",
             "mfu_measured_peak": "`MFU vs measured peak` is over the matrix-product peak measured in the run "
                                  "(summary.json's matmul_peak_gflops)"}
    lines = [
        f"# Benchmark: {', '.join(cfg['arms'])} on {cfg['model']}",
        "",
        f"`{result['command']}`",
        "",
        f"{cfg['stages']} stages x {cfg['data_parallel']} replicas, {cfg['steps']} steps per run, "
        f"{cfg['repeats']} interleaved repeats; throughput leaves out the first {cfg['warmup_steps']} steps. "
        "`tokens/s` is summary.json's (tokens per step / median step time); `tokens/s mean` is tokens over the "
        "summed time of the steady steps, pipeline drains and flushes included. "
        + "".join(f"{notes[key]}. " for key, _ in mfu) + "Medians with (min-max).",
        "",
        "| M | link delay ms | arm | tokens/s | tokens/s mean | utilisation per stage | peak RSS MB per stage | "
        "saved activations MB per stage | " + "".join(f"{title} | " for _, title in mfu)
        + "held-out loss | process wall s | launcher wall s |",
        "|" + " --- |" * (11 + len(mfu)),
    ]
    for g in result["groups"]:
        lines.append(f"| {g['M']} | {_delay(g)} | {g['arm']} | {_spread(g['tokens_per_s'])} | "
                     f"{_spread(g['tokens_per_s_mean'])} | "
                     f"{_stages(g['utilisation'], '.2f')} | {_stages(g['peak_rss_mb'], ',.0f')} | "
                     f"{_stages(g['activation_peak_mb'], ',.1f')} | "
                     + "".join(f"{_stages(g.get(key), '.3f')} | " for key, _ in mfu)
                     + f"{_spread(g['val_loss'], '.4f')} | {_spread(g['wall_s'], ',.1f')} | "
                     f"{_spread(g['launcher_wall_s'], ',.1f')} |")
    if result["ratios"]:
        lines += ["", "Paired ratios (each run against the baseline run of the same repeat and M):", "",
                  "| M | link delay ms | arm / baseline | tokens/s | tokens/s mean | held-out loss | "
                  "stage-0 saved activations |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["ratios"]:
            lines.append(f"| {r['M']} | {_delay(r)} | {r['arm']} / {r['vs']} | {_spread(r['tokens_per_s'], '.3f')} | "
                         f"{_spread(r['tokens_per_s_mean'], '.3f')} | {_spread(r['val_loss'], '.3f')} | "
                         f"{_spread(r['stage0_activation'], '.3f')} |")
    if any(g.get("startup_s") for g in result["groups"]):
        lines += ["", "Where each process's wall time went: start-up (imports, process group, data, engine, "
                  "matmul peak) until the first step, the training steps (evaluations included), and the end "
                  "(final evaluation, checkpoint, summary); the launcher's own start-up is the last column's "
                  "difference to the process wall:", "",
                  "| M | link delay ms | arm | start-up s | training s | end s | process wall s | launcher wall s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in result["groups"]:
            end = None if not (g.get("wall_s") and g.get("startup_s") and g.get("train_wall_s")) else {
                "median": g["wall_s"]["median"] - g["startup_s"]["median"] - g["train_wall_s"]["median"], "n": 1}
            lines.append(f"| {g['M']} | {_delay(g)} | {g['arm']} | {_spread(g.get('startup_s'), ',.1f')} | "
                         f"{_spread(g.get('train_wall_s'), ',.1f')} | {_spread(end, ',.1f')} | "
                         f"{_spread(g['wall_s'], ',.1f')} | {_spread(g['launcher_wall_s'], ',.1f')} |")
    if result.get("delay_retention"):
        lines += ["", "Tokens/s kept on a slow link (each run over the same arm's 0 ms run of its repeat and M):", "",
                  "| M | link delay ms | arm | tokens/s kept | tokens/s mean kept |", "| --- | --- | --- | --- | --- |"]
        for r in result["delay_retention"]:
            lines.append(f"| {r['M']} | {_delay(r)} | {r['arm']} | {_spread(r['tokens_per_s'], '.3f')} | "
                         f"{_spread(r['tokens_per_s_mean'], '.3f')} |")
    if result.get("target_loss", cfg.get("target_loss")) is not None:
        target = result.get("target_loss", cfg.get("target_loss"))
        named = f" ({cfg['target_loss']}: the best backprop arm's final held-out loss)" \
            if isinstance(cfg.get("target_loss"), str) else ""
        lines += ["", f"Time to held-out loss {target:.4f}{named} (first evaluation at or below it; "
                  "process wall includes start-up and earlier evaluations):", "",
                  "| M | arm | process wall s | training s |", "| --- | --- | --- | --- |"]
        for g in result["groups"]:
            lines.append(f"| {g['M']} | {g['arm']} | {_spread(g['target_wall_s'], ',.1f')} | "
                         f"{_spread(g['target_train_s'], ',.1f')} |")
    return "\n".join(lines) + "\n"

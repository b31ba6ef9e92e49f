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


def _stages(values, fmt: str) -> str:
    return " / ".join(_num(v, fmt) for v in values) if values else "-"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Benchmark: {', '.join(cfg['arms'])} on {cfg['model']}",
        "",
        f"`{result['command']}`",
        "",
        f"{cfg['stages']} stages x {cfg['data_parallel']} replicas, {cfg['steps']} steps per run, "
        f"{cfg['repeats']} interleaved repeats; throughput leaves out the first {cfg['warmup_steps']} steps. "
        "`tokens/s` is summary.json's (tokens per step / median step time); `tokens/s mean` is tokens over the "
        "summed time of the steady steps, pipeline drains and flushes included. Medians with (min-max).",
        "",
        "| M | arm | tokens/s | tokens/s mean | utilisation per stage | peak RSS MB per stage | "
        "saved activations MB per stage | MFU per stage | held-out loss | process wall s | launcher wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in result["groups"]:
        lines.append(f"| {g['M']} | {g['arm']} | {_spread(g['tokens_per_s'])} | {_spread(g['tokens_per_s_mean'])} | "
                     f"{_stages(g['utilisation'], '.2f')} | {_stages(g['peak_rss_mb'], ',.0f')} | "
                     f"{_stages(g['activation_peak_mb'], ',.1f')} | {_stages(g['mfu'], '.3f')} | "
                     f"{_spread(g['val_loss'], '.4f')} | {_spread(g['wall_s'], ',.1f')} | "
                     f"{_spread(g['launcher_wall_s'], ',.1f')} |")
    if result["ratios"]:
        lines += ["", "Paired ratios (each run against the baseline run of the same repeat and M):", "",
                  "| M | arm / baseline | tokens/s | tokens/s mean | held-out loss | stage-0 saved activations |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in result["ratios"]:
            lines.append(f"| {r['M']} | {r['arm']} / {r['vs']} | {_spread(r['tokens_per_s'], '.3f')} | "
                         f"{_spread(r['tokens_per_s_mean'], '.3f')} | {_spread(r['val_loss'], '.3f')} | "
                         f"{_spread(r['stage0_activation'], '.3f')} |")
    if cfg.get("target_loss") is not None:
        lines += ["", f"Time to held-out loss {cfg['target_loss']} (first evaluation at or below it; "
                  "process wall includes start-up and earlier evaluations):", "",
                  "| M | arm | process wall s | training s |", "| --- | --- | --- | --- |"]
        for g in result["groups"]:
            lines.append(f"| {g['M']} | {g['arm']} | {_spread(g['target_wall_s'], ',.1f')} | "
                         f"{_spread(g['target_train_s'], ',.1f')} |")
    return "\n".join(lines) + "\n"

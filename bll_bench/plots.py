"""PNG plots of a `compare` benchmark: loss against tokens and against seconds, a per-stage
timeline of one traced step per arm, and per-stage memory."""

from __future__ import annotations

from pathlib import Path

from bll_bench.plotting import pyplot
from bll_ds.pipeline.trace import read_timelines

plt = pyplot()

# Timeline colours by what an instruction is doing.
OP_KIND = {
    "ForwardPass": "forward", "ForwardBLL": "forward",
    "BackwardPass": "backward",
    "LocalBackward": "local loss + backward", "FinishStep": "local loss + backward",
    "OptimizerStep": "optimizer", "StageOptimizerStep": "optimizer", "ReduceGrads": "optimizer",
    "ReduceTiedGrads": "optimizer",
    "RecvActivation": "wait / p2p", "RecvActivationBLL": "wait / p2p", "SendActivation": "wait / p2p",
    "SendActivationBLL": "wait / p2p", "RecvGrad": "wait / p2p", "SendGrad": "wait / p2p",
    "PublishTable": "wait / p2p", "BeginStep": "wait / p2p",
}
KIND_COLOUR = {"forward": "tab:blue", "backward": "tab:orange", "local loss + backward": "tab:green",
               "optimizer": "tab:purple", "wait / p2p": "tab:red", "other": "tab:gray"}


def write_all(result: dict, out: Path) -> list[Path]:
    return [loss_curves(result, out / "loss_vs_tokens.png", x="tokens"),
            loss_curves(result, out / "loss_vs_seconds.png", x="seconds"),
            heldout_vs_wall(result, out / "heldout_vs_wall.png"),
            timelines(result, out / "timeline.png"),
            memory(result, out / "memory.png")]


def _first_runs(result: dict) -> list[dict]:
    """One run per (M, arm): repeat 0."""
    return [r for r in result["runs"] if r["repeat"] == 0]


def loss_curves(result: dict, path: Path, x: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in _first_runs(result):
        label = f"{run['arm']} M={run['M']}"
        train_s = dict(map(tuple, run["train_s_at_step"]))
        steps, losses = zip(*run["train_loss"]) if run["train_loss"] else ((), ())
        xs = [s * run["tokens_per_step"] for s in steps] if x == "tokens" else [train_s.get(s) for s in steps]
        line, = ax.plot(xs, losses, lw=1, alpha=0.8, label=f"{label} train")
        if run["val"]:
            vsteps, vloss = zip(*run["val"])
            vx = [s * run["tokens_per_step"] for s in vsteps] if x == "tokens" else [train_s.get(s) for s in vsteps]
            ax.plot(vx, vloss, "o--", color=line.get_color(), ms=3, label=f"{label} held-out")
    return _save(fig, ax, "tokens" if x == "tokens" else "training seconds (sum of step times)", "loss",
                 f"loss against {x} (repeat 0)", path)


def heldout_vs_wall(result: dict, path: Path) -> Path:
    """Held-out loss against seconds since each run's process started (every repeat), with the
    time-to-loss target as a line: the headline plot of a time-to-loss benchmark."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for run in result["runs"]:
        if not run.get("val_wall"):
            continue
        key = (run["arm"], run["M"])
        xs, ys = zip(*run["val_wall"])
        line, = ax.plot(xs, ys, "o-", ms=2.5, lw=1, color=colours.get(key),
                        label=None if key in colours else f"{run['arm']} M={run['M']}")
        colours.setdefault(key, line.get_color())
    if result.get("target_loss") is not None:
        ax.axhline(result["target_loss"], color="black", lw=0.8, ls=":", label=f"target {result['target_loss']:.4f}")
    return _save(fig, ax, "seconds since the run's process started", "held-out loss",
                 "held-out loss against wall-clock time (all repeats)", path)


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timelines(result: dict, path: Path) -> Path:
    """One traced step per (M, arm), stages as rows, time relative to the step's first event."""
    runs = _first_runs(result)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.9 * len(runs) * 1.0), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        stages = read_timelines(Path(run["run_dir"]))
        if not stages:
            ax.set_axis_off()
            continue
        step = stages[0]["steps"][1]  # the last traced step
        events = [(s["stage"], e) for s in stages for e in s["events"] if e["step"] == step]
        t0 = min(e["start"] for _, e in events)
        for stage, e in events:
            kind = OP_KIND.get(e["op"], "other")
            ax.barh(stage, (e["end"] - e["start"]) * 1e3, left=(e["start"] - t0) * 1e3, height=0.8,
                    color=KIND_COLOUR[kind], edgecolor="none")
        ax.set_yticks(range(len(stages)), [f"stage {s['stage']}" for s in stages], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{run['arm']} M={run['M']}: step {step}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("milliseconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOUR.values()]
    fig.legend(handles, KIND_COLOUR.keys(), loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory(result: dict, path: Path) -> Path:
    groups = result["groups"]
    fig, (ax_rss, ax_act) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        label = f"{g['arm']} M={g['M']}"
        for ax, key in ((ax_rss, "peak_rss_mb"), (ax_act, "activation_peak_mb")):
            values = [v or 0 for v in g[key]]
            ax.bar([s + i * width for s in range(len(values))], values, width, label=label)
    for ax, title in ((ax_rss, "peak RSS per stage (MB)"), (ax_act, "saved activations per stage (MB)")):
        n = len(groups[0]["peak_rss_mb"]) if groups else 0
        ax.set_xticks([s + 0.4 - width / 2 for s in range(n)], [f"stage {s}" for s in range(n)])
        ax.set_title(title, fontsize=9)
    ax_act.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

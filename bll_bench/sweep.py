"""Depth sweep: block-local learning against backprop at 2-16 stages, and truncated backprop.

    python -m bll_bench sweep --plan depth --data ../shared/data/kernel-docs.jsonl --out results/sweep-d16
    python -m bll_bench sweep --plan shakespeare --data ../shared/data/tinyshakespeare.txt --out results/sweep-char8

Every run is one `python scripts/pretrain.py --emulate` process (bll_ds/pipeline/emulated/emulator.py), one
after another, on the same tokens (tokenizer, seed, batch shape and schedule are shared):

    bp-L{N}            backprop on the plan's model: N = all its layers (the baseline), or the
                       truncated models with N = L/S layers that show how much depth buys
    bll-{variant}-S{S} block-local learning, S stages of the full model
    ...-seed{N}        the same with --seed N (not the default 1234), in the same folder; a BLL run
                       compares with its own seed's backprop where that ran, else the default's

The first run trains the tokenizer; the sweep keeps a copy (OUT/tokenizer.model) that every later
run loads, so all runs see the same tokens. A run with a summary.json is done; a run with
checkpoints is resumed (--resume); so the command continues where a killed sweep stopped. An --out under results/ is committed without its
checkpoints (.gitignore): on another machine, finished runs count as done and an unfinished one
starts again. --only picks runs by name. The table (sweep.md, sweep.json)
and the plot of held-out loss against tokens are rewritten from whatever runs in the folder are
complete or in progress (the plan's, and those other plans or --variants put there, each BLL run
against backprop on its own model), each time the command runs (--table_only: without training).

    recovered = (L_truncated - L_BLL) / (L_truncated - L_BP)

compares BLL at S stages with backprop on the L/S-layer model (what one stage holds) and on all L
layers: 0 = the later stages add nothing, 1 = BLL matches backprop.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bll_bench.plotting import pyplot
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.run.config_file import with_config
from bll_ds.infra.errors import UserError
from bll_ds.method import variants as bll_variants
from bll_ds.method.variant_options import run_name
from bll_ds.run import run_dir as names

REPO = Path(__file__).resolve().parents[1]
DEPTH_GATE = 0.05  # depth must pay: BP on all layers at least 5% below the 1-layer model


@dataclass(frozen=True)
class Plan:
    """A named sweep: the model, its DeepSpeed config, tokenizer, length and the runs."""
    model: str
    deepspeed_config: str
    tokenizer: str
    steps: int
    stages: tuple[int, ...]
    variants: tuple[str, ...]
    eval_points: int = 20
    eval_batches: int = 20
    final_eval_batches: int = 200
    seq_len: int | None = None


PLANS = {
    # 16 layers, 4.3M parameters; 1280 steps x 16 x 256 tokens = 5.24M tokens.
    "depth": Plan("models/llama-d16.json", "ds_configs/llama-d16.json", "bpe:4096", 1280, (2, 4, 8, 16),
                  ("prototype", "dgl")),
    # nanogpt-char widened to 8 layers, with the recipe of docs/results/quality.md's Tiny Shakespeare
    # tables but 4x as long: 8000 steps x 12 x 64 = 6.1M characters (5.5 epochs). At those tables'
    # 2000 steps depth does not pay (8 layers end 0.7% above 1 layer; `-- --steps 2000
    # --eval_interval 100` repeats that). Peak lr 4e-3, tuned for bp-L8 (docs/results/quality.md).
    # The final evaluation covers the whole held-out split.
    "shakespeare": Plan("models/nanogpt-char-d8.json", "ds_configs/nanogpt-char-d8.json", "char", 8000, (4, 8),
                        ("prototype", "dgl"), final_eval_batches=0, seq_len=64),
    # The depth plan's model and recipe at a real vocabulary (docs/results/vocabulary.md):
    # kernel-docs through a 32,768-piece BPE, S = 8, 5.24M tokens. The local readouts' cost grows
    # 8x with V; the cheap readout options (docs/METHOD.md, "Readout options") are compared here
    # with the full one.
    "kernel-32k": Plan("models/llama-d16.json", "ds_configs/llama-d16-v32k.json", "bpe:32768", 1280, (8,),
                       ("dgl-context",)),
    # The same recipe on 16 layers, for the levers at S = 16; lr 4e-3 as tuned for 8 layers.
    "shakespeare-d16": Plan("models/nanogpt-char-d16.json", "ds_configs/nanogpt-char-d8.json", "char", 8000, (16,),
                            ("dgl",), final_eval_batches=0, seq_len=64),
    # Testbed candidates where nothing is memorised: the Tiny Shakespeare recipe on kernel-docs at
    # character level, 6.1M characters = a quarter of one pass. Both plans share one --out (their
    # 1-layer control is the same model). In fp32 on every machine: bf16 "auto" picked fp32 on the
    # machines of every committed run and bf16 on one with native bf16, which would have put runs
    # of two precisions in one table.
    "kernel-char-d8": Plan("models/nanogpt-char-d8.json", "ds_configs/nanogpt-char-d8-fp32.json", "char", 8000, (8,),
                           ("dgl-context",), seq_len=64),
    "kernel-char-d16": Plan("models/nanogpt-char-d16.json", "ds_configs/nanogpt-char-d8-fp32.json", "char", 8000, (16,),
                            ("dgl-context",), seq_len=64),
}


def _layers(model: str | Path) -> int:
    """Decoder layers of a model spec (llama's num_hidden_layers, gpt2's n_layer)."""
    spec = json.loads((REPO / model).read_text())
    return spec.get("num_hidden_layers", spec.get("n_layer"))


DEFAULT_SEED = 1234
_RUN_NAME = re.compile(r"^(?:bp-L(?P<layers>\d+)|bll-(?P<variant>.+)-S(?P<stages>\d+))(?:-seed(?P<seed>\d+))?$")


def seed_suffix(seed: int) -> str:
    """Runs with another --seed share the folder under their own names: bll-dgl-S8-seed2."""
    return "" if seed == DEFAULT_SEED else f"-seed{seed}"


def parse_run_name(name: str) -> dict | None:
    """{"layers"} for bp-L{n}, {"variant", "stages"} for bll-{variant}-S{s}, both with "seed";
    None for a name the sweep does not make."""
    match = _RUN_NAME.match(name)
    if match is None:
        return None
    parts = {k: v for k, v in match.groupdict().items() if v is not None}
    for key in ("layers", "stages", "seed"):
        if key in parts:
            parts[key] = int(parts[key])
    parts.setdefault("seed", DEFAULT_SEED)
    return parts


def runs_of(plan: Plan, seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """Run name -> the pretrain.py flags that make it (besides the shared ones), most telling
    first: the baseline, the 1-layer control, then from the deepest pipeline down, each BLL run
    after the truncated model its recovered fraction needs; the second variant last. Names carry
    the seed where it is not the default (`seed_suffix`)."""
    layers, suffix = _layers(plan.model), seed_suffix(seed)
    runs = {f"bp-L{layers}{suffix}": ["--method", "bp", "--stages", "1"]}
    for variant in plan.variants:
        for s in sorted(plan.stages, reverse=True):
            per_stage = layers // s
            if per_stage < layers:
                runs.setdefault(f"bp-L{per_stage}{suffix}",
                                ["--method", "bp", "--stages", "1", "--truncate", str(per_stage)])
            runs[f"bll-{run_name(variant)}-S{s}{suffix}"] = ["--method", "bll", "--bll_variant", variant,
                                                              "--stages", str(s)]
    if layers > 1:
        runs.setdefault(f"bp-L1{suffix}", ["--method", "bp", "--stages", "1", "--truncate", "1"])
    return runs


def _truncated_spec(plan: Plan, layers: int, out: Path, write: bool = True) -> Path:
    """The plan's model cut to `layers` layers, as a spec file in the sweep folder (written only
    when a run needs it: a listing names it without writing)."""
    path = out / "specs" / f"{Path(plan.model).stem}-L{layers}.json"
    if write:
        spec = json.loads((REPO / plan.model).read_text())
        spec["num_hidden_layers" if "num_hidden_layers" in spec else "n_layer"] = layers
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(spec, indent=2) + "\n")
    return path


def _command(plan: Plan, name: str, flags: list[str], args, out: Path) -> list[str]:
    model = plan.model
    if "--truncate" in flags:
        at = flags.index("--truncate")
        model = str(_truncated_spec(plan, int(flags[at + 1]), out, write=not args.list))
        flags = flags[:at] + flags[at + 2:]
    run_dir = out / name
    shared = out / names.TOKENIZER_MODEL  # trained by the first run, then used by every run
    tokenizer = str(shared) if shared.is_file() and plan.tokenizer != "char" else plan.tokenizer
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--emulate", "--model", model,
           "--deepspeed_config", args.deepspeed_config or plan.deepspeed_config, "--tokenizer", tokenizer,
           "--steps", str(plan.steps), "--eval_interval", str(plan.steps // plan.eval_points),
           "--eval_batches", str(plan.eval_batches), "--final_eval_batches", str(plan.final_eval_batches),
           "--save_interval", str(plan.steps // 10), "--log_interval", "10", "--seed", str(args.seed),
           "--out", str(run_dir), "--no-progress", *flags]
    if plan.seq_len:
        cmd += ["--seq_len", str(plan.seq_len)]
    if args.data:
        cmd += ["--data", args.data]
    if (names.checkpoints(run_dir) / names.LATEST).is_file():
        cmd.append("--resume")
    return cmd + list(args.extra)


def _share_tokenizer(run_dir: Path, out: Path) -> None:
    """One tokenizer for the whole sweep: the same tokens for every run, trained and tokenized once."""
    source, shared = run_dir / names.TOKENIZER_MODEL, out / names.TOKENIZER_MODEL
    if source.is_file() and not shared.is_file():
        shutil.copyfile(source, shared)


def val_curve(run_dir: Path) -> list[tuple[int, int, float]]:
    """(step, tokens, held-out loss) at every evaluation of a run, from its metrics.jsonl."""
    metrics = run_dir / names.METRICS
    if not metrics.is_file():
        return []
    points, tokens_per_step = {}, None
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        if "val/loss" in m:
            points[m["step"]] = m["val/loss"]
        if tokens_per_step is None and "train/tokens_seen" in m:
            tokens_per_step = m["train/tokens_seen"] // m["step"]
    return [(step, step * (tokens_per_step or 0), loss) for step, loss in sorted(points.items())]


def _runs_in(plan: Plan, out: Path) -> list[str]:
    """The plan's runs and every other run in the folder (another plan's depth, other variants and
    seeds, earlier sweeps): backprop from the deepest model down, then block-local by stages and
    name, each seed after the default one."""
    found = {d.name for d in out.iterdir() if d.is_dir() and parse_run_name(d.name)} if out.is_dir() else set()
    parsed = {n: parse_run_name(n) for n in set(runs_of(plan)) | found}
    bp = sorted((n for n, p in parsed.items() if "layers" in p), key=lambda n: (-parsed[n]["layers"], n))
    bll = sorted((n for n, p in parsed.items() if "stages" in p), key=lambda n: (parsed[n]["stages"], n))
    return bp + bll


def baseline_name(layers: int, seed: int, ran) -> str:
    """Backprop on `layers` layers with the same seed where `ran(name)` says it ran, else the
    default seed's: what a run with `seed` is compared with."""
    own = f"bp-L{layers}{seed_suffix(seed)}"
    return own if ran(own) else f"bp-L{layers}"


def _model_layers(run_dir: Path, default: int) -> int:
    """The run's decoder layers (its model_config.json), which name its backprop baseline bp-L{layers}."""
    config = run_dir / names.MODEL_CONFIG
    return (_layers(config.resolve()) or default) if config.is_file() else default


def tabulate(plan: Plan, out: Path) -> dict:
    """Every run's final and half-way held-out loss, BLL/BP ratios and recovered fractions: the
    plan's runs and any other in the folder, each BLL run against backprop on its own model."""
    layers = _layers(plan.model)
    rows, curves = [], {}
    for name in _runs_in(plan, out):
        run_dir = out / name
        curve = val_curve(run_dir)
        if not curve:
            continue
        curves[name] = [(tokens, loss) for _, tokens, loss in curve]
        summary_path = run_dir / names.SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        half_step = (summary["steps"] if summary else plan.steps) // 2
        rows.append({"run": name, "complete": summary is not None, "tokens": curve[-1][1],
                     "final": summary["val_loss"] if summary else None, "last_eval": curve[-1][2],
                     "half": {step: loss for step, _, loss in curve}.get(half_step),
                     "tokens_per_s": summary["tokens_per_s"] if summary else None,
                     "model_gflops_per_s": summary.get("model_gflops_per_s") if summary else None})
    by_name = {r["run"]: r for r in rows}
    for r in rows:
        parsed = parse_run_name(r["run"])
        if "stages" not in parsed:
            continue
        depth = _model_layers(out / r["run"], layers)
        bp = by_name.get(baseline_name(depth, parsed["seed"], by_name.__contains__))
        if bp is None:
            continue
        truncated = by_name.get(baseline_name(depth // parsed["stages"], parsed["seed"], by_name.__contains__))
        for key, point in (("final", "final"), ("half", "half")):
            mine, base = r[point], bp[point]
            r[f"ratio_{key}"] = round(mine / base, 4) if mine and base else None
            if truncated and mine and base and truncated[point] and truncated[point] != base:
                r[f"recovered_{key}"] = round((truncated[point] - mine) / (truncated[point] - base), 3)
    result = {"plan": plan.__dict__ | {"stages": list(plan.stages), "variants": list(plan.variants)},
              "rows": rows, "curves": curves}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "sweep.md", _markdown(rows))
    if curves:
        _plot(curves, out / "sweep_val_loss.png", title=f"{Path(plan.model).stem}: held-out loss")
    return result


def depth_pays(plan: Plan, out: Path, gate: float, seed: int = DEFAULT_SEED) -> str | None:
    """None when backprop on all layers ends at least `gate` below the 1-layer model (held-out
    loss, both runs complete), else why the sweep should not go on. Where depth does not pay for
    backprop, BLL "matching" it says nothing about what the later stages learn. A property of the
    model and data: with another seed, that seed's baselines where they ran, else the default's."""
    layers = _layers(plan.model)
    finals = {}
    for depth in (layers, 1):
        summary = out / baseline_name(depth, seed, lambda n: (out / n / names.SUMMARY).is_file()) / names.SUMMARY
        if not summary.is_file():
            return f"{summary.parent.name} has not finished; run the baselines first (--only bp-L{layers},bp-L1)."
        finals[depth] = json.loads(summary.read_text())["val_loss"]
    deep, shallow = finals[layers], finals[1]
    if deep <= (1 - gate) * shallow:
        return None
    return (f"depth does not pay here: backprop on {layers} layers ends at held-out {deep:.4f}, the 1-layer model "
            f"at {shallow:.4f} ({(deep / shallow - 1) * 100:+.2f}%; the gate asks for -{gate * 100:.2f}% or lower). "
            f"Train longer (-- --steps N), or choose a model and budget where depth pays; --depth_gate 0 runs anyway.")


def _markdown(rows: list[dict]) -> str:
    def f(value, digits=4):
        return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
    lines = ["| run | tokens | final held-out | BLL/BP | recovered | half-way held-out | BLL/BP at half | "
             "recovered at half | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        final = r["final"] if r["complete"] else None
        lines.append(f"| {r['run']}{'' if r['complete'] else ' (unfinished)'} | {r['tokens'] / 1e6:.2f}M | "
                     f"{f(final) or f(r['last_eval']) + ' (last eval)'} | {f(r.get('ratio_final'))} | "
                     f"{f(r.get('recovered_final'), 3)} | {f(r['half'])} | {f(r.get('ratio_half'))} | "
                     f"{f(r.get('recovered_half'), 3)} | {f(r['tokens_per_s'], 0)} |")
    return "\n".join(lines) + "\n"


def _plot(curves: dict, path: Path, title: str, order: list[str] | None = None) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in order or sorted(curves):
        curve = curves[name]
        style = "-" if name.startswith("bll-prototype") else "--" if name.startswith("bll-") else ":"
        ax.plot([t / 1e6 for t, _ in curve], [v for _, v in curve], style, label=name, linewidth=1.5)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_bench sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="depth",
                   help="Which sweep: its model, DeepSpeed config, tokenizer, steps, stage counts and variants "
                        "(PLANS in bll_bench/sweep.py; --list prints its runs).")
    p.add_argument("--out", required=True, help="Sweep folder: one run dir per run, sweep.md/json, the plot.")
    p.add_argument("--data", default=None, help="Corpus (default: the trainer's default corpus).")
    p.add_argument("--only", default=None, help="Comma-separated run names (default: every run of the plan).")
    p.add_argument("--deepspeed_config", default=None, help="Override the plan's DeepSpeed config (e.g. another lr).")
    p.add_argument("--variants", default=None,
                   help="Comma-separated BLL variants to run instead of the plan's (e.g. prototype,dgl,prototype-aux).")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="Every run's seed; runs with another seed share the folder as NAME-seed{N}.")
    p.add_argument("--table_only", action="store_true", help="Rewrite the table and plot; train nothing.")
    p.add_argument("--list", action="store_true", help="Print the runs and their commands; train nothing.")
    p.add_argument("--plot_runs", default=None,
                   help="Comma-separated run names: also draw their held-out curves alone, to --plot_path (a "
                        "figure for a page, where the folder's own plot holds every run).")
    p.add_argument("--plot_path", default=None, help="Where --plot_runs's figure goes (a .png path).")
    p.add_argument("--depth_gate", type=float, default=DEPTH_GATE,
                   help="Before any BLL run: backprop on all layers must end this fraction below the "
                        "1-layer model, or the sweep stops (it would measure nothing about depth; 0 = off).")
    p.add_argument("--config", default=None, help="A sweep recipe (recipes/bench/*.yaml): these flags' names and "
                   "values, in JSON or YAML; flags given beside it override it.")
    p.add_argument("extra", nargs="*", help="After --: flags passed to every pretrain.py run.")
    args = p.parse_args(with_config(p, argv))
    plan, out = PLANS[args.plan], Path(args.out)
    if bool(args.plot_runs) != bool(args.plot_path):
        raise UserError("--plot_runs and --plot_path go together.", "give both, or neither.")
    if args.variants:
        chosen_variants = tuple(args.variants.split(","))
        if "--custom_import" in args.extra:  # a variant of the user's own, registered as the runs will
            bll_variants.import_custom(args.extra[args.extra.index("--custom_import") + 1])
        unknown = [v for v in chosen_variants if not bll_variants.is_known(v)]
        if unknown:
            raise UserError(f"--variants names {unknown}, which are not registered BLL variants (with valid options).",
                            f"choose from {', '.join(bll_variants.names())}, options as NAME:dim=64:neg=2048 "
                            "(bll_ds/method/variant_options.py), or register one with `-- --custom_import FILE.py`.")
        plan = replace(plan, variants=chosen_variants)
    runs = runs_of(plan, args.seed)
    suffix = seed_suffix(args.seed)
    # --only takes the names --list prints, or the same without the seed suffix
    chosen = [n if n in runs or not suffix else n + suffix for n in args.only.split(",")] if args.only else list(runs)
    unknown = [name for name in chosen if name not in runs]
    if unknown:
        raise UserError(f"--only names runs {unknown} that the {args.plan} plan does not have.",
                        f"choose from {', '.join(runs)}.")
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        cmd = _command(plan, name, runs[name], args, out)
        if args.list:
            print(name, " ".join(cmd))
            continue
        if args.table_only or (out / name / names.SUMMARY).is_file():
            continue
        if name.startswith("bll-") and args.depth_gate > 0:
            verdict = depth_pays(plan, out, args.depth_gate, args.seed)
            if verdict is not None:
                print(f"sweep: stopped before {name}: {verdict}", file=sys.stderr, flush=True)
                tabulate(plan, out)
                return 3
        run_dir = out / name
        if run_dir.exists() and not (names.checkpoints(run_dir) / names.LATEST).is_file():
            shutil.rmtree(run_dir)  # started but never checkpointed (or its checkpoints stayed on another machine)
        print(f"sweep: {name}: {' '.join(cmd)}", flush=True)
        with open(out / f"{name}.log", "a") as log:
            code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        _share_tokenizer(out / name, out)
        if code != 0:
            print(f"sweep: {name} failed (exit {code}); see {out / (name + '.log')}", file=sys.stderr, flush=True)
            tabulate(plan, out)
            return code
        tabulate(plan, out)
    if args.list:  # a listing writes nothing: a sweep may be writing the table in another process
        return 0
    result = tabulate(plan, out)
    print(result and (out / "sweep.md").read_text(), end="")
    if args.plot_runs:
        plot_selected(result["curves"], args.plot_runs.split(","), Path(args.plot_path),
                      title=f"{out.name}: held-out loss")
    return 0


def plot_selected(curves: dict, runs: list[str], path: Path, title: str) -> None:
    """The held-out curves of `runs` alone (names as in the folder's table), in the order given."""
    missing = [name for name in runs if name not in curves]
    if missing:
        raise UserError(f"--plot_runs names {missing}, which have no held-out curve in the folder.",
                        f"choose from {', '.join(sorted(curves))}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    _plot({name: curves[name] for name in runs}, path, title, order=runs)

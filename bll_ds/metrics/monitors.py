"""W&B and CSV logging from the DeepSpeed config's own monitor sections.

A DeepSpeed user turns these on in the JSON they already have:

    "csv_monitor": {"enabled": true, "output_path": "logs/", "job_name": "llama-1b-bll"},
    "wandb": {"enabled": true, "project": "bll", "group": "s8", "team": "my-team"}

DeepSpeed's own monitor classes write on global rank 0 only, which in a pipeline is stage 0: it
never sees the language-model loss (the last stage does). So the trainer reads the same sections
(DeepSpeed's own config models, same keys and defaults) and writes them from its run log, on
the last stage's first replica, with the same scalars as metrics.jsonl. The sections are taken
out of the config that DeepSpeed's engine gets, so nothing is written twice.

CSV files follow DeepSpeed's csv_monitor layout: OUTPUT_PATH/JOB_NAME/<tag with / as _>.csv, a
`step,<name>` header, one row per logged step. An empty output_path means the run dir.
W&B: one run per training run, resumed under the same id after --resume (the id is kept in the
run dir); WANDB_MODE=offline works as W&B documents.
"""

from __future__ import annotations

import csv
import json
import secrets
from pathlib import Path

MONITOR_SECTIONS = ("csv_monitor", "wandb")
WANDB_ID_FILE = "wandb_id.txt"


def take_monitor_sections(ds_config: dict) -> dict:
    """Remove the sections the trainer writes itself from `ds_config`; return them."""
    return {name: ds_config.pop(name) for name in MONITOR_SECTIONS if name in ds_config}


class CsvMonitor:
    def __init__(self, section: dict, run_dir: Path):
        from deepspeed.monitor.config import CSVConfig

        config = CSVConfig(**section)
        self.dir = Path(config.output_path or run_dir) / config.job_name
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            path = self.dir / (tag.replace("/", "_").replace(" ", "_") + ".csv")
            new = not path.exists()
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", tag.split("/")[-1]])
                writer.writerow([step, value])

    def close(self) -> None:
        pass


class WandbMonitor:
    def __init__(self, section: dict, run_dir: Path, run_config: dict):
        from deepspeed.monitor.config import WandbConfig

        try:
            import wandb
        except ImportError:
            from bll_ds.infra.errors import UserError
            raise UserError("the DeepSpeed config enables wandb, but the wandb package is not installed.",
                            "pip install wandb (or pip install -e '.[wandb]'), or set wandb.enabled false.") from None
        config = WandbConfig(**section)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=config.project, group=config.group, entity=config.team, id=run_id,
                              resume="allow", dir=str(run_dir), name=run_dir.name,
                              config=json.loads(json.dumps(run_config, default=str)))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def build_monitors(sections: dict, run_dir: Path, run_config: dict) -> list:
    monitors = []
    if sections.get("csv_monitor", {}).get("enabled"):
        monitors.append(CsvMonitor(sections["csv_monitor"], run_dir))
    if sections.get("wandb", {}).get("enabled"):
        monitors.append(WandbMonitor(sections["wandb"], run_dir, run_config))
    return monitors

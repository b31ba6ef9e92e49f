"""`--config FILE`: a command's flags given as a file (JSON or YAML).

A file stands for the flags it sets, placed before the command line's own, so one parser reads
both and a flag given beside the file overrides it (argparse keeps the last value). Types,
choices and ranges are checked once, the same way for both.

Two shapes, one conversion (`with_config`):
- the benchmark harness and the sweeps: a flat mapping of flag names to values;
- pretrain: a run dir's run_config.json shape, top-level fields and the sections (`bll:`,
  `eval:`, `checkpoint:`, ...) as mappings of their fields, which `flatten` (given by the
  caller, bll_ds/run/config.py) turns into the flat form first.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Callable

from bll_ds.infra.errors import UserError

RUN_CONFIG = "run_config.json"  # as bll_ds/run/run_dir.py names it; this module stays import-light


def read_config_file(path: str) -> tuple[Path, dict]:
    """The file and its mapping. A run dir stands for its run_config.json."""
    file = Path(path)
    if file.is_dir():
        file = file / RUN_CONFIG
    if not file.is_file():
        raise UserError(f"--config {path}: no such file.",
                        "pass a .json or .yaml file (recipes/*.yaml), or a run dir that holds run_config.json.")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"--config {file}: not valid YAML: {err}.", "fix the file's syntax.") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UserError(f"--config {file}: not valid JSON: {err}.",
                            "fix the file's syntax (or give a YAML file a .yaml suffix).") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {file} holds a {type(data).__name__}, not a mapping of field names to values.",
                        "write it as a mapping, e.g. as a run dir's run_config.json is written.")
    return file, data


def unknown_field(file: Path, name: str, known, where: str = "") -> UserError:
    close = difflib.get_close_matches(name, list(known), n=1)
    return UserError(f"--config {file}: unknown field `{name}`{where}.",
                     f"did you mean `{close[0]}`?" if close else f"the fields: {', '.join(sorted(known))}.")


Flatten = Callable[[Path, dict, set], dict]


def with_config(parser: argparse.ArgumentParser, argv: list[str], flatten: Flatten | None = None) -> list[str]:
    """argv with the flags of `--config FILE` put first. The parser defines --config itself (for
    --help). flatten(file, data, flags given on the command line) -> {flag name: value}, for a
    file that is not already flat."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return argv
    file, data = read_config_file(path)
    if flatten is not None:
        given = {"--" + arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
        data = flatten(file, data, given)
    return _flags(parser, file, data) + argv


def _flags(parser: argparse.ArgumentParser, file: Path, data: dict) -> list[str]:
    """{flag name: value} as command-line tokens: a switch true/false, a repeated flag's list as
    repeats, another list comma-joined, null as the default."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    out = []
    for name, value in data.items():
        action = actions.get(name)
        if action is None:
            raise unknown_field(file, name, actions)
        flag, switch = action.option_strings[0], action.nargs == 0
        if value is None:
            if action.default is not None:
                raise UserError(f"--config {file}: `{name}: null` is not a value (its default is {action.default!r}).",
                                f"give `{name}` a value, or leave it out for the default.")
        elif switch or isinstance(value, bool):
            if not (switch and isinstance(value, bool)):
                raise UserError(f"--config {file}: `{name}` takes " + ("true or false" if switch else "one value")
                                + f", not {value!r}.", f"write `{name}: VALUE` ({flag} in --help).")
            if isinstance(action, argparse.BooleanOptionalAction):
                out.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                out.append(flag)
        elif isinstance(value, list) and isinstance(action, argparse._AppendAction):
            out += [token for item in value for token in (flag, str(item))]
        elif isinstance(value, list) and action.type in (None, str):  # a comma-separated flag
            out += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (dict, list)):
            raise UserError(f"--config {file}: `{name}` takes one value, not {value!r}.",
                            f"write `{name}: VALUE` ({flag} in --help).")
        else:
            out += [flag, str(value)]
    return out

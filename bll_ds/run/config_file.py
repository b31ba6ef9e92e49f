"""`--config FILE`: a run described by a file (JSON or YAML), in the shape of a run dir's
run_config.json: top-level fields, and the sections (`bll:`, `eval:`, `checkpoint:`, ...) as
mappings of their fields.

A file stands for the flags it sets, placed before the command line's own, so one parser reads
both and a flag given beside the file overrides it (argparse keeps the last value). Types,
choices and ranges are checked once, the same way for both.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

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
                        "write it as a run dir's run_config.json is written: model: ..., bll: {variant: ...}.")
    return file, data


def config_file_argv(path: str, fields: list, command_line: set[str]) -> list[str]:
    """The flags the file at `path` stands for.

    fields: (section name or None, field, flag) for every flag of RunConfig, as config.py lists them.
    command_line: the flags given on the command line (`--name`, underscores). A file's `resume`
    belongs to the run dir the file names: with another --out, `--config OLD_RUN --out NEW`
    reproduces the run in NEW from step 0 unless --resume is given too.
    """
    file, data = read_config_file(path)
    by_key = {(section, f.name): (f, flag) for section, f, flag in fields}
    sections = {section for section, _, _ in fields if section is not None}
    argv = []
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise UserError(f"--config {file}: `{key}` is a section and takes a mapping of its fields, "
                                f"not {value!r}.", f"write `{key}:` with its fields below it, as in a run dir's "
                                f"run_config.json.")
            items = [(key, name, v) for name, v in value.items()]
        else:
            items = [(None, key, value)]
        for section, name, v in items:
            if (section, name) not in by_key:
                known = sorted({n for s, n in by_key if s == section} | (sections if section is None else set()))
                close = difflib.get_close_matches(name, known, n=1)
                where = f"section `{section}`" if section else "the top level"
                raise UserError(f"--config {file}: unknown field `{name}` in {where}.",
                                f"did you mean `{close[0]}`?" if close else f"the fields there: {', '.join(known)}.")
            f, flag = by_key[(section, name)]
            if flag == "resume" and "out" in data and "--out" in command_line:
                continue
            argv += _flag_tokens(f, flag, v, file)
    return argv


def _flag_tokens(f, flag: str, value, file: Path) -> list[str]:
    if value is None:
        if f.default is not None:
            raise UserError(f"--config {file}: `{f.name}: null` is not a value (its default is {f.default!r}).",
                            f"give `{f.name}` a value, or leave it out for the default.")
        return []  # the default already
    if f.type == "bool":
        if not isinstance(value, bool):
            raise UserError(f"--config {file}: `{f.name}` is true or false, not {value!r}.",
                            f"write `{f.name}: true` or `{f.name}: false`.")
        return [f"--{flag}" if value else f"--no-{flag}"]
    if f.type == "list[str]":
        if not isinstance(value, list):
            raise UserError(f"--config {file}: `{f.name}` is a list, not {value!r}.",
                            f"write `{f.name}: [\"a.b=1\", ...]`.")
        return [token for item in value for token in (f"--{flag}", str(item))]
    if isinstance(value, (dict, list, bool)):
        raise UserError(f"--config {file}: `{f.name}` takes one value, not {value!r}.",
                        f"write `{f.name}: VALUE` (python scripts/pretrain.py --help, --{flag}).")
    return [f"--{flag}", str(value)]


def with_flat_config(parser, argv: list[str]) -> list[str]:
    """argv with the flags of `--config FILE` put first, for a command whose flags are flat (the
    benchmark harness's): the file maps each flag's name to its value (a list for a comma-separated
    or repeated flag; true/false for a switch). The parser must define --config itself, for --help."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return argv
    file, data = read_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    out = []
    for key, value in data.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1)
            raise UserError(f"--config {file}: unknown field `{key}`.",
                            f"did you mean `{close[0]}`?" if close else f"the fields: {', '.join(sorted(actions))}.")
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise UserError(f"--config {file}: `{key}` is true or false, not {value!r}.",
                                f"write `{key}: true` or `{key}: false`.")
            if isinstance(action, argparse.BooleanOptionalAction):
                out.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                out.append(flag)
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            out += [flag, str(value)]
    return out + argv

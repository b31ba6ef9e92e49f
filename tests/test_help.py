"""Every entry point's --help works alone: exit code 0, a usage line, a help line for every
option, and no "(default: None)". The entry points are found, not listed: every script under
scripts/ and every module of bll_ds and bll_bench that runs as __main__; subcommands are added
from bll_bench's COMMANDS and the two modules that take their own. All of them run in one
subprocess (tests/help_probe.py), which pays the torch and deepspeed imports once."""

import json
import os
import re
import subprocess
import sys

import pytest

from bll_bench.__main__ import COMMANDS
from helpers import REPO

# Modules whose first argument picks a subcommand with its own parser (besides bll_bench's COMMANDS).
SUBCOMMANDS = {"bll_bench": list(COMMANDS), "bll_bench.simulate": ["project"],
               "bll_bench.memory": ["clusters", "rss-check"]}
_MAIN = re.compile(r"^if __name__ == .__main__.:", re.MULTILINE)


def _entry_points() -> list[tuple[str, str, list[str]]]:
    entries = [("script", str(path.relative_to(REPO)), [])
               for path in sorted((REPO / "scripts").rglob("*.py"))
               if not path.name.startswith("_") and _MAIN.search(path.read_text())]
    for package in ("bll_ds", "bll_bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            if not _MAIN.search(path.read_text()):
                continue
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.removesuffix(".__main__")
            entries += [("module", module, [])] + [("module", module, [sub]) for sub in SUBCOMMANDS.get(module, [])]
    return entries


ENTRY_POINTS = _entry_points()


def _name(entry) -> str:
    kind, target, args = entry
    return " ".join([target if kind == "script" else f"-m {target}", *args])


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    env = {**os.environ, "COLUMNS": "100", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "help_probe.py"), json.dumps(ENTRY_POINTS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {_name((r["kind"], r["target"], r["args"])): r for r in results}


def options_without_help(text: str) -> list[str]:
    """The items of argparse's argument sections that print only their name: an item line (two
    spaces, then a flag or a positional name) with no help after it on the line and no more
    deeply indented line under it."""
    lines = text.splitlines()
    missing, in_section = [], False
    for i, line in enumerate(lines):
        if re.match(r"^\S.*:$", line):  # "options:", "positional arguments:", a group's title
            in_section = True
            continue
        if not line.strip():
            continue
        if not line.startswith(" "):
            in_section = False
            continue
        item = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not in_section or not item or line.startswith("   "):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        continued = len(following) - len(following.lstrip()) > 2 and following.strip()
        if not item.group(2) and not continued:
            missing.append(item.group(1))
    return missing


def test_the_checker_sees_a_missing_help_line():
    text = ("usage: x [-h] [--a A] [--b B]\n\noptions:\n  -h, --help  show this help message and exit\n"
            "  --a A\n  --b B       what b holds (default: 2)\n  --very_long_flag VERY_LONG_FLAG\n"
            "              the help on its own line\n  --c C\n")
    assert options_without_help(text) == ["--a A", "--c C"]


def test_every_entry_point_is_found():
    names = {_name(e) for e in ENTRY_POINTS}
    assert {"scripts/pretrain.py", "scripts/rehearse_stage.py", "-m bll_ds.data.prepare_tokens",
            "-m bll_bench compare", "-m bll_bench.memory", "-m bll_bench.memory clusters",
            "-m bll_bench.memory_budget", "-m bll_bench.simulate project"} <= names, names


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=_name)
def test_help_works_alone_and_documents_every_option(helps, entry):
    got = helps[_name(entry)]
    out = got["stdout"]
    assert got["code"] == 0, got["stderr"][-3000:]
    assert re.search(r"^usage: ", out, re.MULTILINE), out
    assert options_without_help(out) == [], out
    assert "(default: None)" not in out, out


def test_prepare_tokens_former_flag_still_parses(capsys):
    from bll_ds.data.prepare_tokens import build_parser

    base = ["--data", "d", "--tokenizer", "char", "--out", "o"]
    assert build_parser().parse_args(base).tokenize_workers == 1
    assert build_parser().parse_args([*base, "--workers", "3"]).tokenize_workers == 3
    assert "--workers is now --tokenize_workers" in capsys.readouterr().err

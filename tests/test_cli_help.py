"""--help of every user-facing command shows every default, and every flag says what it holds."""

import argparse
import runpy
from pathlib import Path

import pytest

from bll_ds.run.config import build_parser


def _captured_parser(monkeypatch, script: str) -> argparse.ArgumentParser:
    """The parser a script's main() builds, taken at its parse_args call (nothing else runs)."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.syspath_prepend(str(Path(script).parent))  # the scripts import their _bootstrap
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="help_check")["main"]([])
    return captured["parser"]


def _check(parser: argparse.ArgumentParser) -> None:
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings or action.dest} has no help line"
    text = parser.format_help()
    optional = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                and not isinstance(a, argparse._HelpAction) and not a.required and a.default is not None]
    assert text.count("(default:") >= len(optional), text
    assert "(default: None)" not in text  # a required flag, or one whose absence its help explains


def test_pretrain_help_shows_every_default():
    parser = build_parser()
    _check(parser)
    text = " ".join(parser.format_help().split())
    assert "--bll_steps_per_call BLL_STEPS_PER_CALL" in text and "(default: 32)" in text
    assert "BLL only" in text  # the flag says it does not chunk backprop runs


@pytest.mark.parametrize("script", ["scripts/evaluate.py", "scripts/generate.py", "scripts/export.py"])
def test_use_scripts_document_every_flag(monkeypatch, repo, script):
    _check(_captured_parser(monkeypatch, str(repo / script)))


def test_peer_pretrain_help_needs_no_schedule(repo, capsys, monkeypatch):
    """--help alone prints --schedule's help and then pretrain.py's flags, which it shares."""
    monkeypatch.syspath_prepend(str(repo / "scripts"))
    main = runpy.run_path(str(repo / "scripts" / "peer_pretrain.py"), run_name="help_check")["main"]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--schedule {1f1b," in text and "--model MODEL" in text and "--bll_variant" in text

"""Runs `--help` of many entry points in this one interpreter, each as `python -m MODULE ...` or
`python SCRIPT ...` would run it (run_name "__main__", its own sys.argv, a script's folder first on
sys.path), and prints one JSON object per entry point: exit code, stdout, stderr. One process
pays torch's and deepspeed's import once instead of once per entry point (tests/test_help.py).

    python tests/help_probe.py '[["module", "bll_bench", ["compare"]], ["script", "scripts/pretrain.py", []]]'
"""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback


def run(kind: str, target: str, args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = [target, *args, "--help"]
            if kind == "script":
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:  # noqa: BLE001 - the test reports it
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return {"kind": kind, "target": target, "args": args, "code": code,
            "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> int:
    for kind, target, args in json.loads(sys.argv[1]):
        print(json.dumps(run(kind, target, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

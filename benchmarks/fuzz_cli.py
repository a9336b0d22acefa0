"""Larger run of the CLI fuzz suite (tests/test_fuzz_cli.py): count cases and failures.

Every generated command line is checked with the same contract as the test
(exit code 0/1 or one-line error, no traceback, inputs unchanged, nothing
outside the output folder touched, no partial file, strict JSON); a failing
case is recorded and the run goes on, so the output is a count, not the first
failure.

    python benchmarks/fuzz_cli.py                  # 150 cases per command, run/survey 40
    python benchmarks/fuzz_cli.py --per-command 40 --commands select,fit
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from test_fuzz_cli import case, check_case  # noqa: E402

COMMANDS = ["extract", "prepare", "fit", "select", "calibrate", "simulate", "run", "survey"]


def fuzz(command: str, n: int):
    stats = {"cases": 0, "failures": 0, "exit_codes": collections.Counter(), "examples": [], "slowest": (0.0, "")}

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case(command))
    def run(spec):
        stats["cases"] += 1
        t0 = time.perf_counter()
        try:
            r = check_case(spec)
            stats["exit_codes"][r.exit_code] += 1
        except Exception as exc:  # noqa: BLE001 - a failing case is counted, the run goes on
            stats["failures"] += 1
            if len(stats["examples"]) < 5:
                stats["examples"].append(f"{type(exc).__name__}: {str(exc)[:400]}"
                                         if isinstance(exc, AssertionError) else traceback.format_exc(limit=3))
        dt = time.perf_counter() - t0
        if dt > stats["slowest"][0]:
            stats["slowest"] = (round(dt, 1), json.dumps(spec, default=str)[:300])

    run()
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-command", type=int, default=150)
    ap.add_argument("--per-folder-command", type=int, default=40, help="cases for run and survey (slower)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    total = {"cases": 0, "failures": 0}
    rows = {}
    for cmd in a.commands.split(","):
        n = a.per_folder_command if cmd in ("run", "survey") else a.per_command
        t0 = time.perf_counter()
        s = fuzz(cmd, n)
        dt = time.perf_counter() - t0
        rows[cmd] = {"cases": s["cases"], "failures": s["failures"], "exit_codes": dict(s["exit_codes"]),
                     "seconds": round(dt, 1), "examples": s["examples"], "slowest": s["slowest"]}
        total["cases"] += s["cases"]
        total["failures"] += s["failures"]
        print(f"{cmd:10s} cases={s['cases']:4d} failures={s['failures']:3d} exit codes={dict(s['exit_codes'])} "
              f"({dt:.0f} s; slowest case {s['slowest'][0]} s)", flush=True)
        for e in s["examples"]:
            print("    " + e.replace("\n", "\n    "), flush=True)
    print(f"TOTAL cases={total['cases']} failures={total['failures']}")
    if a.json:
        print(json.dumps({"total": total, "commands": rows}))
    return 1 if total["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

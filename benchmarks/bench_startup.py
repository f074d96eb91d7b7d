"""How long the commands that do not train take to answer: help, data check, a config error.

Each command runs in a fresh process (as a user types it); the best of N wall times is
reported, so the figure is the command's own cost, not the machine's noise. Run it on an idle
machine, before and after a change, with the same N:

    python benchmarks/bench_startup.py                 # best of 5
    python benchmarks/bench_startup.py --repeats 10 --json outputs/startup.json
    python benchmarks/bench_startup.py --src /other/checkout/src   # the same commands, other code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "blurb"

# (label, argv after the Python executable, expected exit status)
COMMANDS = (
    ("blurbtune report --help", ["-m", "blurbtune.cli", "report", "--help"], 0),
    ("blurbtune data check", ["-m", "blurbtune.cli", "data", "check", str(FIXTURES)], 0),
    ("python train.py --help", [str(ROOT / "train.py"), "--help"], 0),
    ("config error (unknown stabilizer)", [str(ROOT / "train.py"), "stabilizer=nope"], 1),
    ("config error (unknown key)", [str(ROOT / "train.py"), "model=tiny", "epochz=3"], 1),
)


def time_command(argv: list[str], env: dict, cwd: Path, expected: int, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], env=env, cwd=cwd,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != expected:
            raise SystemExit(f"{argv}: exit {done.returncode}, expected {expected}:\n"
                             f"{done.stderr[-2000:]}")
    return {"best_s": min(times), "median_s": sorted(times)[len(times) // 2], "runs": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per command (best is reported)")
    p.add_argument("--src", type=Path, default=ROOT / "src",
                   help="the blurbtune source folder to time (default: this checkout's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(args.src), "HF_HUB_OFFLINE": "1"}
    cwd = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = {}
    print(f"best of {args.repeats} wall times, fresh process each ({sys.executable})")
    print(f"{'command':<36}{'best s':>8}{'median s':>10}")
    for label, command, expected in COMMANDS:
        rows[label] = time_command(command, env, cwd, expected, args.repeats)
        print(f"{label:<36}{rows[label]['best_s']:>8.2f}{rows[label]['median_s']:>10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeats": args.repeats, "src": str(args.src),
                                         "commands": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

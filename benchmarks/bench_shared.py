"""The quickstart on a shared machine: idle, and beside another torch process using 2 threads.

On a 2-core machine, a run that starts one OpenMP thread per core competes with any other
torch job; busy-waiting OpenMP threads make that far worse than sharing the cores. This times
`python train.py experiment=quickstart` (fresh run folder and token cache each time) with the
machine otherwise idle and with a concurrent matmul loop in another process
(torch.set_num_threads(2), torch's defaults otherwise), for each case:

  default    blurbtune's defaults: threads = the CPUs this process may use,
             OMP_WAIT_POLICY=PASSIVE set by the entry point
  threads1   threads=1
  active     OMP_WAIT_POLICY=ACTIVE (OpenMP threads spin while they wait)
  omp1       OMP_NUM_THREADS=1 in the environment (what users did by hand)

OMP_NUM_THREADS and OMP_WAIT_POLICY are removed from the environment unless a case sets them.
Run it on an otherwise idle machine; compare another checkout with --src (only `default` and
`omp1` exist before the threads setting):

    python benchmarks/bench_shared.py                           # all cases, best of 1
    python benchmarks/bench_shared.py --src /old/checkout/src --cases default,omp1
    python benchmarks/bench_shared.py --quick          # the tiny smoke run: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "blurb"
CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "threads1": ({}, ["threads=1"]),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []),
    "omp1": ({"OMP_NUM_THREADS": "1"}, []),
}
LOAD = ("import torch\n"
        "torch.set_num_threads(2)\n"
        "a = torch.randn(1024, 1024)\n"
        "while True:\n"
        "    a @ a\n")


def clean_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_once(src: Path, case: str, quick: bool, work: Path) -> float:
    extra_env, overrides = CASES[case]
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{case}-"))
    target = ["experiment=smoke", "task=biosses", f"data_dir={FIXTURES}"] if quick \
        else ["experiment=quickstart"]
    cmd = [sys.executable, str(ROOT / "train.py"), *target, *overrides,
           f"hydra.run.dir={run_dir / 'run'}", f"data.cache_dir={run_dir / 'cache'}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**clean_env(src), **extra_env}, cwd=run_dir,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{case}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return wall


def timed(src: Path, case: str, quick: bool, work: Path, repeats: int, shared: bool) -> float:
    load = None
    if shared:
        load = subprocess.Popen([sys.executable, "-c", LOAD], env=clean_env(src))
        time.sleep(2)  # let it reach its loop
    try:
        return min(run_once(src, case, quick, work) for _ in range(repeats))
    finally:
        if load is not None:
            load.terminate()
            load.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per figure (best is reported)")
    p.add_argument("--src", type=Path, default=ROOT / "src", help="blurbtune source to time")
    p.add_argument("--quick", action="store_true", help="the tiny smoke run instead")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    # A kill (timeout, Ctrl-C) must still stop the load process: unwind through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")
    rows = {}
    print(f"{'quick smoke run' if args.quick else 'quickstart'}, best of {args.repeats}; "
          f"{os.cpu_count()} CPUs; code: {args.src}")
    print(f"{'case':<10}{'idle s':>9}{'shared s':>10}{'shared/idle':>13}")
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        for case in cases:
            idle = timed(args.src, case, args.quick, Path(tmp), args.repeats, shared=False)
            shared = timed(args.src, case, args.quick, Path(tmp), args.repeats, shared=True)
            rows[case] = {"idle_s": idle, "shared_s": shared, "ratio": shared / idle}
            print(f"{case:<10}{idle:>9.1f}{shared:>10.1f}{shared / idle:>13.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, "repeats": args.repeats,
                                         "src": str(args.src), "cases": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

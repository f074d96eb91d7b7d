"""How long `blurbtune report` takes on a large sweep, old code against new in one invocation.

The sweep is synthetic and made from the committed BIOSSES study (docs/study/runs): its 50
runs at the study's own lr (5 stabilizers x seeds 0-9) copied under each of N learning rates
(lr and task.lr rewritten in results.json and .hydra/config.yaml), so 45 lr values give 2,250
runs in 225 configurations. `--fail K` then blanks `test.best` in K runs (a NaN score) and
drops `dev` from K others, so the page's "left out" section has something to name.

    python benchmarks/bench_report.py --old /tmp/report-base/src            # 45 x 50 runs
    python benchmarks/bench_report.py --lrs 3 --keep outputs/synthetic      # a small sweep, kept

Each report runs in its own process (as a user types it), old and new alternately, `--repeats`
times; the best wall time, the CPU seconds of that process (user + system: what to compare on
a machine shared with other jobs) and the peak RSS of each are printed with their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study" / "runs"
RUN_FILES = ("results.json", "provenance.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
STUDY_LR = 1e-4
# `blurbtune report ARGS` in this process, then its peak RSS (KiB) and CPU seconds (user +
# system) as stderr's last line.
MEASURED = """
import resource, sys
from blurbtune.cli import main
try:
    code = main(sys.argv[1:])
finally:
    use = resource.getrusage(resource.RUSAGE_SELF)
    print("maxrss", use.ru_maxrss, "cpu", use.ru_utime + use.ru_stime, file=sys.stderr)
sys.exit(code)
"""


def study_runs() -> list[Path]:
    """The study's run folders at its own lr (no `task.lr=` in the folder name)."""
    return sorted(p for p in STUDY.iterdir() if p.is_dir() and "task.lr=" not in p.name)


def make_sweep(out: Path, n_lrs: int, fail: int = 0) -> int:
    """Write n_lrs x the study's runs under `out`; the number of runs written."""
    lrs = [STUDY_LR * (1 + i / 100) for i in range(n_lrs)]
    written = 0
    for lr in lrs:
        for run in study_runs():
            folder = out / f"lr={lr:.6g}" / run.name
            for name in RUN_FILES:
                if (run / name).is_file():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(run / name, folder / name)
            result = json.loads((folder / "results.json").read_text())
            result["lr"] = lr
            if written < fail and result.get("test"):
                result["test"]["best"] = float("nan")
            elif fail <= written < 2 * fail:
                result.pop("dev", None)
            (folder / "results.json").write_text(json.dumps(result))
            config = folder / ".hydra" / "config.yaml"
            text = re.sub(r"(?m)^(  lr: )0\.0001$", rf"\g<1>{lr!r}", config.read_text())
            config.write_text(text)
            written += 1
    return written


def time_report(src: Path, sweep: Path, out: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, "report", str(sweep), "--out",
                           str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    last = done.stderr.strip().splitlines()[-1].split()
    rss, cpu = int(last[1]), float(last[3])
    if done.returncode != 0:
        raise SystemExit(f"report with {src} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    page = out / "report.html"
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss / 1024, "files": len(
        list(out.rglob("*.*"))), "folder_mb": size / 2**20,
        "page_mb": page.stat().st_size / 2**20 if page.exists() else None}


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--lrs", type=int, default=45, help="learning rates (x 50 runs)")
    parse.add_argument("--fail", type=int, default=0, help="runs with NaN test.best, and as "
                       "many without dev")
    parse.add_argument("--old", type=Path, default=None, help="src/ of the old code")
    parse.add_argument("--repeats", type=int, default=1)
    parse.add_argument("--keep", type=Path, default=None, help="write the sweep here and keep it")
    args = parse.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    sweep = args.keep or tmp / "sweep"
    n = make_sweep(sweep, args.lrs, args.fail)
    print(f"{n} runs ({args.lrs} lr x {len(study_runs())}) in {sweep}")
    codes = {"new": ROOT / "src"} | ({"old": args.old} if args.old else {})
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, src in codes.items():
            got = time_report(src, sweep, tmp / f"report-{name}")
            if name not in best or got["wall_s"] < best[name]["wall_s"]:
                best[name] = got
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else
                                            f"{k} {v}" for k, v in got.items()), flush=True)
    if "old" in best:
        print(f"new/old wall time {best['new']['wall_s'] / best['old']['wall_s']:.3f}, "
              f"CPU time {best['new']['cpu_s'] / best['old']['cpu_s']:.3f}, "
              f"peak RSS {best['new']['peak_rss_mb'] / best['old']['peak_rss_mb']:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

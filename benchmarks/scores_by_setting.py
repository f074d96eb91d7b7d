"""Dev and test scores of a sweep grouped by one setting: does a speed setting change scores?

Reads every `results.json` under the sweep folder, groups the completed runs by the value of
one override (e.g. `data.group_by_length`), and prints a Markdown table of mean ± standard
deviation over seeds, with n, and each seed's score; the setting is within seed noise when
the difference of means is small against the standard deviations.

    python train.py -m model=minilm task=ncbi_disease data.group_by_length=false,true \
        seed=0,1,2 name=check-grouping ...
    python benchmarks/scores_by_setting.py outputs/multirun/check-grouping data.group_by_length
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def collect(folder: Path, key: str) -> dict[str, list[dict]]:
    """Completed runs under `folder` by the value `key` was set to (`(default)` if not set)."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(folder.rglob("results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed":
            continue
        value = next((o.split("=", 1)[1] for o in r.get("overrides", [])
                      if o.split("=", 1)[0].lstrip("+") == key), "(default)")
        groups.setdefault(value, []).append(r)
    return groups


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f} (n={len(values)})"


def table(groups: dict[str, list[dict]], key: str) -> str:
    lines = [f"| {key} | metric | dev best, mean ± sd | test best, mean ± sd | test best by seed |"
             " train time s, mean |", "|---|---|---|---|---|---|"]
    for value, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        dev = [r["dev"]["best"] for r in runs]
        test = [r["test"]["best"] for r in runs]
        seeds = ", ".join(f"{r['seed']}: {r['test']['best']:.4f}" for r in runs)
        lines.append(f"| {value} | {runs[0]['metric']} | {_cell(dev)} | {_cell(test)} | {seeds} | "
                     f"{statistics.mean(r['train_time_s'] for r in runs):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("key", help="the override to group by, e.g. data.group_by_length")
    args = p.parse_args(argv)
    groups = collect(args.sweep, args.key)
    if not groups:
        raise SystemExit(f"error: no completed results.json under {args.sweep}")
    print(table(groups, args.key))


if __name__ == "__main__":
    main()

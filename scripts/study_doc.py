"""Regenerate the study's report from its committed runs and refresh the tables of docs/study.md.

    python scripts/study_doc.py            # docs/study/report/ and the blocks of docs/study.md

Also `blurbtune report` over the GPU runs of docs/study/gpu/ into docs/study/gpu/report/.

A block in docs/study.md is `<!-- report: NAME -->` (NAME: a Markdown file of the report),
`<!-- gpu-report: NAME -->` (the same, of the GPU runs' report), `<!-- trainer: -->` (the
plain Trainer baseline's table), `<!-- selection: -->` (what selecting on the dev set gave,
from the runs' own records), `<!-- pilot: -->` (the adapters' learning-rate pilot),
`<!-- devices: -->` (BIOSSES on the CPU against the same seeds stacked on a GPU),
`<!-- crosstask: -->` (each stabilizer's verdict per task, beside Tinn et al.'s advice and
`stabilizer=recommended`) or `<!-- lr-pilot: -->` (the GPU study's learning-rate pilots, by
scripts/gpu_study.py's rule), ended by `<!-- end -->`; only the text between the markers is
rewritten. tests/test_study.py checks that the doc is current.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
STUDY = ROOT / "docs" / "study"
DOC = ROOT / "docs" / "study.md"
BLOCK = re.compile(r"(<!-- (report|gpu-report|trainer|selection|pilot|devices|crosstask|lr-pilot)"
                   r": ?(\S*) -->\n)(.*?)(<!-- end -->)", re.S)
PILOT = STUDY / "pilot-adapters"
GPU = STUDY / "gpu"
# The GPU run folders the report covers, where present: BIOSSES stacked, the three tasks'
# studies (PubMedQA's at its pilot's lr) and PubMedQA's runs at the preset's recipe.
GPU_SWEEPS = ("biosses", "gad", "pubmedqa", "pubmedqa-recipe", "hoc")
# Columns of the cross-task table: (label, report folder, task).
CROSS_TASK = (("BIOSSES, CPU", STUDY / "report", "biosses"),
              ("BIOSSES, GPU stacked", GPU / "report", "biosses"),
              ("PubMedQA", GPU / "report", "pubmedqa"), ("GAD", GPU / "report", "gad"),
              ("HoC", GPU / "report", "hoc"))
CROSS_STABILIZERS = ("freeze_lower", "llrd", "reinit_top", "llrd+reinit_top")
MINILM = ("bert", 6)  # all-MiniLM-L6-v2's model_type and encoder layers, as recommend() reads them
# The study's learning rate: the selection table covers its settings, and a technique run at
# another lr (the adapters, at the lr their pilot chose) is compared with `none` at this one.
LR = 1e-4


def trainer_summary() -> str:
    return _script("study_trainer", "benchmarks").summary_markdown(STUDY / "trainer")


def selection_rows(runs: Path = STUDY / "runs") -> list[dict]:
    """Per completed run: its setting (stabilizer and lr), seed, the test score of its
    best-on-dev epoch and of its last epoch, and, where the run recorded test at every epoch
    (`test_every_epoch`), the best test score over its epochs (an oracle: it looks at test)."""
    import json

    rows = []
    for path in sorted(runs.glob("*/results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed":
            continue
        tests = [h["test"] for h in r["history"] if "test" in h]
        rows.append({"stabilizer": r["stabilizer"], "lr": r["lr"], "seed": r["seed"],
                     "best_on_dev": r["test"]["best"], "last": r["test"]["last"],
                     "oracle": max(tests) if len(tests) == len(r["history"]) else None})
    return rows


def selection_markdown(rows: list[dict]) -> str:
    """What picking the checkpoint on a 16-pair dev set gave on test, per setting (x100): the
    best-on-dev epoch against the last epoch (paired over the same runs) and against the best
    test epoch (an oracle, over the runs that recorded test at every epoch)."""
    import numpy as np
    from scipy import stats

    def cell(values: list[float]) -> str:
        v = 100 * np.asarray(values)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    lines = ["| Stabilizer | lr | n | Best-on-dev epoch | Last epoch | Δ best-on-dev - last "
             "(paired t) | n (oracle) | Best test epoch (oracle) | Δ oracle - best-on-dev |",
             "|---|---|---|---|---|---|---|---|---|"]
    settings = {(r["stabilizer"], r["lr"]) for r in rows}
    for name, lr in sorted(settings, key=lambda s: (s[0] != "none", s[0], s[1] != LR, s[1])):
        mine = [r for r in rows if (r["stabilizer"], r["lr"]) == (name, lr)]
        best = [r["best_on_dev"] for r in mine]
        last = [r["last"] for r in mine]
        diff = 100 * (np.asarray(best) - np.asarray(last))
        p = stats.ttest_rel(best, last).pvalue if len(mine) > 1 and diff.std() > 0 else None
        seen = [r for r in mine if r["oracle"] is not None]
        gap = 100 * np.asarray([r["oracle"] - r["best_on_dev"] for r in seen])
        lines.append(
            f"| {name} | {lr:g} | {len(mine)} | {cell(best)} | {cell(last)} | {diff.mean():+.2f} "
            f"({'p=' + format(p, '.3f') if p is not None else 'no test'}) | {len(seen)} | "
            + (f"{cell([r['oracle'] for r in seen])} | {gap.mean():+.2f}" if seen else "- | -")
            + " |")
    return "\n".join(lines)


def pilot_markdown(folder: Path = PILOT) -> str:
    """The adapters' learning-rate pilot: per stabilizer and lr, each seed's best dev score
    (the only score used to choose) and whether its test predictions collapsed, the mean best
    dev, and the lr chosen (highest mean best dev; ties to the lower lr). Test is shown for
    the record, never used to choose."""
    import json
    import statistics

    runs: dict[tuple[str, float], list[dict]] = {}
    for path in sorted(folder.glob("*/results.json")):
        r = json.loads(path.read_text())
        runs.setdefault((r["stabilizer"], r["lr"]), []).append(r)
    lines = ["| Stabilizer | lr | seeds | best dev per seed (x100) | mean best dev | test per "
             "seed (x100) | collapsed on test | chosen |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted({k[0] for k in runs}):
        lrs = sorted(lr for stab, lr in runs if stab == name)

        def mean_dev(lr: float, name: str = name) -> float:
            return statistics.mean(r["dev"]["best"] if r["status"] == "completed" else
                                   float("-inf") for r in runs[(name, lr)])

        chosen = max(lrs, key=lambda lr: (mean_dev(lr), -lr))
        for lr in lrs:
            rs = sorted(runs[(name, lr)], key=lambda r: r["seed"])
            ok = [r for r in rs if r["status"] == "completed"]
            lines.append(
                f"| {name} | {lr:g} | {', '.join(str(r['seed']) for r in rs)} | "
                + ", ".join(f"{100 * r['dev']['best']:.1f}" for r in ok)
                + f" | {100 * mean_dev(lr):.1f} | "
                + ", ".join(f"{100 * r['test']['best']:.1f}" for r in ok)
                + f" | {sum(r['collapsed']['test'] for r in ok)}/{len(ok)} | "
                + ("yes" if lr == chosen else "") + " |")
    return "\n".join(lines)


def _script(name: str, folder: str = "scripts"):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_sweeps(root: Path = GPU) -> list[Path]:
    """The GPU run folders present, in GPU_SWEEPS order."""
    return [root / name for name in GPU_SWEEPS if (root / name).is_dir()]


def _scores(folder: Path, lr: float | None = None) -> dict[str, dict[int, float]]:
    """Completed runs' best-on-dev test scores by stabilizer (as the report names it) and seed."""
    import json

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("*/results.json")):
        r = json.loads(path.read_text())
        if r["status"] == "completed" and (lr is None or r["lr"] == lr):
            name = r["stabilizer"] if isinstance(r["stabilizer"], str) else \
                "+".join(r["stabilizer"])
            out.setdefault(name, {})[r["seed"]] = r["test"]["best"]
    return out


def devices_markdown(cpu: Path = STUDY / "runs", gpu: Path = GPU / "biosses") -> str:
    """BIOSSES at lr 1e-4, the same settings and seeds on the CPU (single runs) and on the GPU
    (stacks of 10, bf16): per setting the two distributions of test Pearson (x100) compared
    (Welch's t-test of means, Kolmogorov-Smirnov, Brown-Forsythe of spread) and the same seed
    on the two devices (median |difference|, and how many seeds agree within 1e-6)."""
    import numpy as np
    from scipy import stats

    a, b = _scores(cpu, LR), _scores(gpu, LR)
    lines = ["| Stabilizer | n CPU / GPU | CPU | GPU | Welch t (means) | KS | Brown-Forsythe "
             "(spread) | same seed: median \\|Δ\\| | same seed within 1e-6 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(set(a) & set(b), key=lambda n: (n != "none", n)):
        x, y = np.array(list(a[name].values())), np.array(list(b[name].values()))
        seeds = sorted(set(a[name]) & set(b[name]))
        diff = np.abs([a[name][s] - b[name][s] for s in seeds])
        lines.append(
            f"| {name} | {len(x)} / {len(y)} | {100 * x.mean():.2f} ± {100 * x.std(ddof=1):.2f} "
            f"| {100 * y.mean():.2f} ± {100 * y.std(ddof=1):.2f} | "
            f"p={stats.ttest_ind(x, y, equal_var=False).pvalue:.3f} | "
            f"p={stats.ks_2samp(x, y).pvalue:.3f} | "
            f"p={stats.levene(x, y, center='median').pvalue:.3f} | "
            f"{100 * np.median(diff):.2f} | {int((diff <= 1e-6).sum())}/{len(seeds)} |")
    return "\n".join(lines)


def _verdicts(report: Path) -> dict[tuple[str, str], dict]:
    """A report's verdict.csv rows by (task, stabilizer); none where the report has none."""
    import csv

    path = report / "verdict.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {(row["task"], row["stabilizer"]): row for row in csv.DictReader(f)}


def _settings_with_runs(report: Path) -> set[tuple[str, str]]:
    """A report's (task, stabilizer) pairs that have runs, from its summary.csv."""
    import csv

    path = report / "summary.csv"
    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        return {(row["task"], row["stabilizer"]) for row in csv.DictReader(f)}


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def crosstask_markdown(columns=CROSS_TASK) -> str:
    """Each stabilizer against `none` per task, from the reports' verdict.csv (verdict, Δ mean
    x100 and its paired p, n pairs), then what Tinn et al. advise for the task's kind (their
    findings for a BERT-base and a BERT-large model, by blurbtune.recommend) and what
    `stabilizer=recommended` picks for MiniLM."""
    from blurbtune.config import compose
    from blurbtune.recommend import recommend

    verdicts = [_verdicts(report) for _, report, _ in columns]
    ran = [_settings_with_runs(report) for _, report, _ in columns]
    lines = ["| stabilizer | " + " | ".join(label for label, _, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in CROSS_STABILIZERS:
        cells = []
        for (_, _, task), found, have in zip(columns, verdicts, ran, strict=True):
            row = found.get((task, name))
            if row is not None and not row["mean_diff"]:
                cells.append("no `none` to compare with")
            elif row is not None:
                cells.append(f"{row['verdict']}: {100 * float(row['mean_diff']):+.1f} "
                             f"({_p(float(row['ttest_p']))}), n={row['n_pairs']}")
            else:
                cells.append("no `none` to compare with" if (task, name) in have else "not run")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    advice, picks = [], []
    for _, _, task in columns:
        t = compose([f"task={task}"]).task
        n_train = int(t.blurb.counts.train)
        base, large = (recommend("bert", layers, str(t.type), n_train).stabilizer
                       for layers in (12, 24))
        advice.append(f"`{base}`" if base == large else
                      f"`{base}` (BERT-base), `{large}` (BERT-large, ELECTRA)")
        picks.append(f"`{recommend(*MINILM, str(t.type), n_train).stabilizer}`")
    lines.append("| Tinn et al.'s advice for this kind of task | " + " | ".join(advice) + " |")
    lines.append("| `stabilizer=recommended` for MiniLM | " + " | ".join(picks) + " |")
    return "\n".join(lines)


def lr_pilot_markdown(root: Path = GPU) -> str:
    """The GPU study's learning-rate pilots (`pilot-<task>/` folders), by scripts/gpu_study.py's
    own rule (`pilot_table`, `choose_lr`): per task and lr, each seed's best dev score, the
    mean, how many runs are degenerate on dev, and the lr chosen."""
    import json

    gpu_study = _script("gpu_study")
    lines = ["| Task | lr | seeds | best dev per seed (x100) | mean best dev | degenerate on dev "
             "| chosen |", "|---|---|---|---|---|---|---|"]
    folders = sorted(root.glob("pilot-*"))
    for folder in folders:
        results = [json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))]
        rows = gpu_study.pilot_table([r for r in results if r.get("stabilizer") == "none"])
        for row in rows:
            devs = ", ".join("-" if d is None else f"{100 * d:.1f}" for d in row["dev_best"])
            mean = "-" if row["mean_dev"] is None else f"{100 * row['mean_dev']:.1f}"
            lines.append(f"| {folder.name.removeprefix('pilot-')} | {row['lr']:g} | "
                         f"{', '.join(map(str, row['seeds']))} | {devs} | {mean} | "
                         f"{row['degenerate']}/{len(row['seeds'])} | "
                         f"{'yes' if row['chosen'] else ''} |")
    if not folders:
        lines.append("| (no pilot has run yet: PubMedQA and HoC wait for a GPU call) "
                     "| | | | | | |")
    return "\n".join(lines)


def blocks(out: Path, gpu_out: Path) -> dict:
    """What each kind of block is made from: kind -> function of the block's NAME."""
    return {"report": lambda name: (out / name).read_text(),
            "gpu-report": lambda name: (gpu_out / name).read_text(),
            "trainer": lambda name: trainer_summary(),
            "selection": lambda name: selection_markdown(selection_rows()),
            "pilot": lambda name: pilot_markdown(),
            "devices": lambda name: devices_markdown(),
            "crosstask": lambda name: crosstask_markdown(),
            "lr-pilot": lambda name: lr_pilot_markdown()}


def main() -> None:
    from blurbtune.report.build import build_report

    out, gpu_out = STUDY / "report", GPU / "report"
    build_report([STUDY / "runs"], out, reference_lr=LR)
    build_report(gpu_sweeps(), gpu_out)
    made = blocks(out, gpu_out)

    def fill(m: re.Match) -> str:
        body = made[m.group(2)](m.group(3))
        return f"{m.group(1)}{body.strip()}\n{m.group(5)}"

    DOC.write_text(BLOCK.sub(fill, DOC.read_text()))
    print(f"wrote {out}, {gpu_out} and refreshed the tables of {DOC}")


if __name__ == "__main__":
    main()

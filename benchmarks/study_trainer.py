"""The study's baseline: the same seeds fine-tuned by a plain Hugging Face `Trainer` script.

What a user writes without blurbtune: the same model, data, batch size, epochs, learning rate,
warm-up, weight decay and clipping as blurbtune's config (composed from the same overrides),
dynamic padding, dev evaluation every epoch, the best-on-dev model kept
(`load_best_model_at_end`) and evaluated on test. Each seed writes
`<out>/seed=<s>/trainer_result.json` (dev per epoch, test score, whether the test predictions
are constant, wall time) and `<out>/seed=<s>/test.jsonl` (id, gold, pred); a finished seed
is skipped on a rerun.

    python benchmarks/study_trainer.py --out docs/study/trainer --seeds 0-4 \
        model=minilm task=biosses task.lr=1e-4 data_dir=/path/to/blurb
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def seeds(spec: str) -> list[int]:
    """`0-4` or `0,2,5` as a list of ints."""
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in spec.split(",")]


def run_seed(overrides: list[str], seed: int, out: Path) -> dict:
    import numpy as np
    import torch
    from bench_train import hf_compute_metrics, hf_encode
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from blurbtune.config import compose
    from blurbtune.data import read_splits
    from blurbtune.models import load_model, load_tokenizer
    from blurbtune.module import baseline
    from blurbtune.tasks import task_type

    cfg = compose([*overrides, f"seed={seed}"])
    task = cfg.task
    if task.type != "similarity":
        raise SystemExit("study_trainer.py scores sentence similarity (BIOSSES) only")
    tokenizer = load_tokenizer(cfg.model, task)
    splits = read_splits(task, cfg.data_dir)
    data = {s: hf_encode(splits[s].examples, tokenizer, task, pad=False) for s in splits}
    set_seed(seed)
    model = load_model(cfg.model, task, tokenizer)
    metric = str(task.metric)
    with tempfile.TemporaryDirectory(prefix="study-trainer-") as work:
        args = TrainingArguments(
            output_dir=work, per_device_train_batch_size=int(task.batch_size),
            per_device_eval_batch_size=int(task.batch_size),
            learning_rate=float(cfg.optimizer.lr), weight_decay=float(cfg.optimizer.weight_decay),
            warmup_steps=float(cfg.optimizer.warmup_ratio),
            max_grad_norm=float(cfg.optimizer.gradient_clip_val),
            num_train_epochs=int(cfg.trainer.max_epochs), eval_strategy="epoch",
            save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
            metric_for_best_model=metric, greater_is_better=True, logging_strategy="epoch",
            report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                          eval_dataset=data["dev"],
                          data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=hf_compute_metrics(task))
        t0 = time.perf_counter()
        trainer.train()
        test = trainer.predict(data["test"])
        wall = time.perf_counter() - t0
    preds = np.asarray(test.predictions).reshape(-1)
    gold = [ex["gold"] for ex in splits["test"].examples]
    history = [{"epoch": int(round(h["epoch"])) - 1, "dev": h[f"eval_{metric}"]}
               for h in trainer.state.log_history if f"eval_{metric}" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for row, loss in zip(history, losses, strict=False):
        row["train_loss"] = loss
    # The same definitions as blurbtune's results.json: collapse, and the constant predictor.
    constant = task_type(task.type).collapsed([float(x) for x in preds], task)
    floor = baseline(task, [ex["gold"] for ex in splits["train"].examples], gold)
    score = test.metrics.get(f"test_{metric}")
    score = None if score is None or np.isnan(score) else float(score)
    result = {"trainer": "transformers.Trainer", "seed": seed, "overrides": overrides,
              "metric": metric, "test": score,
              "dev_best": max((h["dev"] for h in history), default=None),
              "baseline_test": floor, "collapsed_test": constant,
              "failed": score is None or constant or score <= floor, "history": history,
              "wall_s": round(wall, 1), "torch_threads": torch.get_num_threads()}
    folder = out / f"seed={seed}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test.jsonl", "w") as f:
        for ex, p in zip(splits["test"].examples, preds, strict=True):
            f.write(json.dumps({"id": ex["id"], "gold": ex["gold"], "pred": float(p)}) + "\n")
    (folder / "trainer_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--summary", action="store_true", help="print the table of --out and stop")
    p.add_argument("overrides", nargs="*", help="blurbtune config overrides")
    args = p.parse_args(argv)
    if args.summary:
        print(summary_markdown(args.out))
        return
    for seed in seeds(args.seeds):
        done = args.out / f"seed={seed}" / "trainer_result.json"
        if done.exists():
            print(f"seed {seed}: done already ({done})")
            continue
        r: Any = run_seed(args.overrides, seed, args.out)
        print(f"seed {seed}: test {r['metric']} {r['test']}, failed={r['failed']}"
              f", {r['wall_s']} s", flush=True)


def summary_markdown(folder: Path) -> str:
    """The baseline's seeds as a Markdown table, then mean ± sample std (x100) with its n.

    Failed = constant test predictions or a test score no better than the constant
    predictor's, as in blurbtune's report; the mean and std are over every seed's test score.
    """
    import numpy as np

    found = Path(folder).glob("*/trainer_result.json")
    results = sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["seed"])
    lines = ["| seed | test pearson (x100) | best dev (x100) | failed | wall s |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {100 * r['test']:.2f} | {100 * r['dev_best']:.2f} | "
                     f"{'yes' if r['failed'] else 'no'} | {r['wall_s']:.0f} |")
    scores = np.array([r["test"] for r in results], dtype=float)
    failed = sum(r["failed"] for r in results)
    std = f"{100 * scores.std(ddof=1):.2f}" if len(scores) > 1 else "-"
    lines.append(f"| all (n={len(results)}) | {100 * scores.mean():.2f} ± {std} | | "
                 f"{failed}/{len(results)} | {sum(r['wall_s'] for r in results):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

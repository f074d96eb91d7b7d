"""Fabricated run folders with known numbers, as a run or a sweep writes them, for the report."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

KNOBS = {"llrd": {"llrd.decay": 0.9}, "llrd+reinit_top": {"llrd.decay": 0.9, "reinit.layers": 1},
         "reinit_top": {"reinit.layers": 1, "reinit.pooler": True}}
WEIGHTS_A = "a" * 8 + "1" * 56
WEIGHTS_B = "b" * 8 + "2" * 56
DATA_SHA = {"train": "c" * 64, "dev": "d" * 64, "test": "e" * 64}
PARTS = ["embeddings", *(f"layer.{i}" for i in range(6)), "pooler", "head"]


@functools.cache
def _composed(overrides: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The run's `.hydra/config.yaml` as Hydra writes it (composed, not resolved, no `hydra`),
    and what the run records of it in results.json (lr, batch size, epochs)."""
    from blurbtune.config import compose

    cfg = compose(list(overrides))
    recorded = {"lr": float(cfg.optimizer.lr), "batch_size": int(cfg.task.batch_size),
                "max_epochs": int(cfg.trainer.max_epochs)}
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_yaml(body), recorded


def stabilizer_override(stabilizer: str) -> str:
    return "stabilizer=[" + ",".join(stabilizer.split("+")) + "]" if "+" in stabilizer \
        else f"stabilizer={stabilizer}"


def write_run(
    root: Path,
    *,
    model: str = "minilm",
    task: str = "biosses",
    stabilizer: str = "none",
    seed: int = 0,
    status: str = "completed",
    test: tuple[float, float] | None = (0.7, 0.69),
    dev: tuple[float, float] | None = (0.8, 0.79),
    lr: float | None = 3e-5,
    batch_size: int = 16,
    max_epochs: int = 10,
    baseline_test: float = 0.0,
    baseline_dev: float = 0.0,
    collapsed_test: bool = False,
    error: str | None = None,
    folder: Path | None = None,
    config: list[str] | None = None,
    weights: str | None = None,
    model_path: str | None = None,
    history: list[dict] | None = None,
    diagnostics: dict | None = None,
) -> Path:
    """A run folder as a sweep writes it; returns the folder.

    Without `config`, `.hydra/config.yaml` holds only the seed (a folder made by another tool);
    with `config` (overrides), it is the real composed config of those overrides plus the seed,
    the stabilizer and the model (lr, batch size and epochs in results.json then come from it),
    and provenance.json records `weights` and DATA_SHA.
    """
    folder = folder or root / model / task / f"{stabilizer}_lr{lr}_bs{batch_size}" / f"seed={seed}"
    (folder / ".hydra").mkdir(parents=True)
    model_path = model_path or f"/models/{model}"
    if config is None:
        (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    else:
        overrides = (f"model={model}", f"task={task}", stabilizer_override(stabilizer),
                     f"seed={seed}", f"model.name_or_path={model_path}", *config)
        text, recorded = _composed(tuple(overrides))
        (folder / ".hydra" / "config.yaml").write_text(text)
        lr, batch_size, max_epochs = recorded["lr"], recorded["batch_size"], recorded["max_epochs"]
        provenance = {
            "model": {"name": model, "source": "local", "path": model_path,
                      "weights": {"model.safetensors": weights or WEIGHTS_A}},
            "tokenizer": {"source": model_path, "fingerprint": "f" * 16},
            "data": {split: {"path": f"/data/{task}/{split}.tsv", "sha256": sha}
                     for split, sha in DATA_SHA.items()},
            "seeds": {"seed": seed, "data_seed": seed, "init_seed": seed},
        }
        (folder / "provenance.json").write_text(json.dumps(provenance))
    result: dict[str, Any] = {
        "status": status,
        "error": error,
        "task": task,
        "task_type": "similarity" if task == "biosses" else "classification",
        "dataset": task.upper(),
        "model": model,
        "model_name_or_path": model_path,
        "stabilizer": stabilizer,
        "stabilizer_knobs": KNOBS.get(stabilizer, {}),
        "seed": seed,
        "data_seed": seed,
        "init_seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "metric": "pearson" if task == "biosses" else "micro_f1",
        "dev": None if dev is None else {"best": dev[0], "last": dev[1]},
        "test": None if test is None else {"best": test[0], "last": test[1]},
        "best_epoch": 4,
        "baseline": {"dev": baseline_dev, "test": baseline_test},
        "collapsed": {"dev": False, "test": collapsed_test},
        "n_examples": {"train": 64, "dev": 16, "test": 20},
        "train_time_s": 12.3,
        "run_dir": str(folder),
        "overrides": [f"seed={seed}", f"stabilizer={stabilizer}"],
    }
    if history is not None:
        result["history"] = history
    if diagnostics is not None:
        result["diagnostics"] = diagnostics
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def grad_diagnostics(scale: float, early_steps: int = 12) -> dict:
    """results.json `diagnostics` with early gradient norms `scale` x a fixed profile per part."""
    early = {part: scale * (1 + i) / 10 for i, part in enumerate(PARTS)}
    early["total"] = sum(early.values())
    return {"grad_norm": {"early": early, "whole": dict(early)}, "early_steps": early_steps,
            "steps": 10 * early_steps, "clip_fraction": 0.35, "clip_threshold": 1.0}

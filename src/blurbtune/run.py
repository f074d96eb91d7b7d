"""One fine-tuning run, from a composed config to a run folder.

The folder holds `.hydra/` (Hydra writes it), `param_groups.json`, `results.json`,
`predictions/{dev,test,test_last}.jsonl`, `provenance.json`, `metrics.csv` (Lightning's CSV
log) and, with `save_model=true`, `model/`. A run whose `results.json` says completed is not
run again; one that left `checkpoints/last.ckpt` resumes from it; only otherwise does it start
fresh.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from blurbtune import console, loggers, provenance, stabilizers, stopping, threads
from blurbtune.datamodule import BlurbDataModule
from blurbtune.errors import DivergedError
from blurbtune.io import read_json, write_json, write_jsonl, write_text_atomic
from blurbtune.lock import LockHeld, RunLock
from blurbtune.models import compile_model, load_model, load_tokenizer, save_model
from blurbtune.module import FineTuner, baseline
from blurbtune.reproducibility import (
    enable_determinism,
    resolve_seeds,
    seed_all,
    set_matmul_precision,
)
from blurbtune.resume import Resumable, last_checkpoint, remove_checkpoints
from blurbtune.stabilizer_config import (  # noqa: F401  (stabilizer_knobs: re-exported)
    apply_stabilizers,
    check_stabilizer,
    resolve,
    stabilizer_knobs,
    stabilizer_name,
)

log = logging.getLogger("blurbtune")

def _output_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/runs/adhoc")


def _identity(cfg: DictConfig, seeds: dict) -> dict:
    return {
        "task": cfg.task.name, "task_type": cfg.task.type, "dataset": cfg.task.folder,
        "model": cfg.model.name,
        "model_name_or_path": cfg.model.get("name_or_path") or "(built in code)",
        "stabilizer": stabilizer_name(cfg.stabilizer),
        "stabilizer_knobs": stabilizer_knobs(cfg.stabilizer),
        **seeds,
        "lr": float(cfg.optimizer.lr), "batch_size": int(cfg.task.batch_size),
        "max_epochs": int(cfg.trainer.max_epochs), "metric": cfg.task.metric,
    }


# Keys of the trainer config that blurbtune reads itself; the rest go to pytorch_lightning.Trainer.
NOT_TRAINER_ARGS = ("matmul_precision", "compile")

FINAL = ("completed", "diverged")  # results, not attempts: a rerun skips them


def run(cfg: DictConfig) -> float:
    """Run one fine-tuning and return its best dev score (NaN when it has none).

    Skipped, with a line saying why: when its result is final (completed; diverged unless
    `rerun_diverged=true`), when another process holds its folder, or when this process has
    been asked to stop (a stopping sweep).
    """
    out = _output_dir(cfg)
    if stopping.requested():
        log.warning("not started, the sweep is stopping: %s", out)
        return math.nan
    if rank_zero_only.rank != 0:  # a DDP process Lightning started: rank 0 holds the lock
        return _run(cfg, out)
    try:
        lock = RunLock(out).acquire()
    except LockHeld as e:
        log.warning("skipping: %s", e)
        return math.nan
    try:
        return _run(cfg, out)
    finally:
        lock.release()


def _final(previous: dict, cfg: DictConfig) -> bool:
    status = previous.get("status")
    return status in FINAL and not (status == "diverged" and cfg.get("rerun_diverged"))


def _skip(previous: dict, out: Path) -> float:
    if previous["status"] == "completed":
        m = previous.get("metric", "score")
        log.info("already completed, skipping (dev %s best %.4f, test best %.4f; delete its "
                 "results.json to run it again): %s", m, previous["dev"]["best"],
                 previous["test"]["best"], out)
        _print_summary(previous, out)
        return float(previous["dev"]["best"])
    log.info("already diverged, skipping (%s; a divergence is a result: rerun_diverged=true "
             "runs it again): %s", previous.get("error"), out)
    return math.nan


def _run(cfg: DictConfig, out: Path) -> float:
    results_path = out / "results.json"
    previous = read_json(results_path) or {}
    if not cfg.get("dry_run") and _final(previous, cfg):
        return _skip(previous, out)
    if previous:
        log.info("previous attempt %s; running again: %s", previous.get("status"), out)
    (out / "error.log").unlink(missing_ok=True)
    seeds = resolve_seeds(cfg.seed, cfg.get("data_seed"), cfg.get("init_seed"))
    identity = _identity(cfg, seeds)
    identity.update(run_dir=str(out), overrides=_overrides())
    identity["threads"] = threads.apply(cfg.get("threads"))
    console.quiet_libraries()
    started = time.time()
    done: dict[str, Any] = {}  # what the run has done so far; _train fills it in
    try:
        result = _train(cfg, out, seeds, identity, done)
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
        status = "diverged" if isinstance(e, DivergedError) else (
            "interrupted" if interrupted else "failed")
        write_text_atomic(out / "error.log", traceback.format_exc())
        if status == "diverged" and not cfg.get("keep_checkpoints"):
            remove_checkpoints(out)  # a final result: nothing will resume from it
        kept = _progress(done, out)
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not cfg.get("dry_run"):
            write_json(results_path, {"status": status, "error": error, **identity, **kept,
                                      "train_time_s": time.time() - started})
        if "dev" in kept:
            log.log(logging.ERROR if status == "failed" else logging.WARNING,
                    "run %s %s while %s (%s); its dev scores%s are recorded in %s", out.name,
                    status, kept["stage"], error,
                    " and checkpoint" if kept.get("checkpoint") else "", results_path)
        if interrupted and stopping.in_pool_worker():
            # A sweep worker stays alive (see stopping.py) but starts no further run.
            stopping.request(signal.SIGTERM)
            log.warning("run %s %s; the sweep is stopping: this worker starts no other run",
                        out.name, status)
            return math.nan
        if isinstance(e, SIGTERMException):  # Lightning's has exit code None: say it failed
            raise SystemExit(128 + signal.SIGTERM) from e
        if interrupted or not _in_multirun():
            raise
        _release_memory()
        log.error("run %s %s: %s (recorded in %s; the sweep goes on)", out.name, status, e,
                  results_path)
        return math.nan
    return result


def _progress(done: dict, out: Path) -> dict:
    """The part of a run that had been done when it stopped: the dev evaluations, the test
    scores, the checkpoint to resume from, and what it was doing (`stage`)."""
    kept: dict[str, Any] = {"stage": done.get("stage")}
    module = done.get("module")
    if module is not None and module.history:
        kept["dev"] = {"best": module.best_score, "last": module.history[-1]["dev"]}
        kept["best_epoch"] = module.best_epoch
        kept["history"] = module.history
    if "test" in done:
        kept["test"] = done["test"]
    checkpoint = last_checkpoint(out)
    kept["checkpoint"] = str(checkpoint) if checkpoint else None
    return kept


def _release_memory() -> None:
    """Give a failed run's GPU memory back before the sweep's next run in this process."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build(cfg: DictConfig, seeds: dict) -> tuple[Any, BlurbDataModule, Any, dict]:
    """Tokenizer, read and tokenised data, and the model with its stabilizers applied.

    Returns (tokenizer, datamodule, model, extras) with extras holding the optimizer groups,
    the frozen and re-initialised parameter names, the determinism flags and the stabilizer
    applied (`stabilizer`, `stabilizer_knobs`, `stabilizer_choice`: see `resolve`). A dry run
    reads no data: the model and its groups come from the model and task configs alone.
    """
    task = cfg.task
    check_stabilizer(cfg.stabilizer)
    flags = enable_determinism(bool(cfg.deterministic))
    flags.update(set_matmul_precision(cfg.trainer.get("matmul_precision")))
    seed_all(seeds["seed"])
    tokenizer = load_tokenizer(cfg.model, task)
    dm = BlurbDataModule(
        task, tokenizer, cfg.data_dir, batch_size=int(task.batch_size),
        eval_batch_size=int(cfg.data.eval_batch_size), cache_dir=cfg.data.cache_dir,
        num_workers=int(cfg.data.num_workers), data_seed=seeds["data_seed"],
        max_train_examples=cfg.data.get("max_train_examples"),
        max_eval_examples=cfg.data.get("max_eval_examples"),
        group_by_length=cfg.data.get("group_by_length", "auto"))
    if not cfg.get("dry_run"):
        dm.prepare()

    seed_all(seeds["init_seed"])
    model = load_model(cfg.model, task, tokenizer)
    applied = resolve(cfg.stabilizer, model, str(task.type), _train_size(cfg, dm))
    groups, frozen, reinit = apply_stabilizers(
        model, applied.pop("sections"), float(cfg.optimizer.lr),
        float(cfg.optimizer.weight_decay), seeds["init_seed"])
    return tokenizer, dm, model, {"groups": groups, "frozen": frozen, "reinit": reinit,
                                  "determinism": flags, "stabilizer": applied}


def _train_size(cfg: DictConfig, dm: BlurbDataModule) -> int:
    """Training examples the run trains on; a dry run reads no data, so it takes the published
    count from the task config (Gu et al. Table 3), capped by `data.max_train_examples`."""
    if not cfg.get("dry_run"):
        return len(dm.examples("train"))
    published = int(cfg.task.blurb.counts.train)
    limit = cfg.data.get("max_train_examples")
    return min(published, int(limit)) if limit else published


def _train(cfg: DictConfig, out: Path, seeds: dict, identity: dict, done: dict) -> float:
    """Train, evaluate and write the run folder; `done` says how far it got, for `run`."""
    task = cfg.task
    done["stage"] = "preparing data and model"
    tokenizer, dm, model, extras = build(cfg, seeds)
    groups, flags = extras["groups"], extras["determinism"]
    identity.update(extras["stabilizer"])  # what `recommended` chose, if it was asked
    # What `data.group_by_length: auto` chose: the report groups runs by what was applied.
    identity["group_by_length"] = dm.group_by_length
    rows = stabilizers.describe_param_groups(model, groups, extras["frozen"], extras["reinit"])
    write_json(out / "param_groups.json", {**identity, "groups": rows})
    if identity["stabilizer_choice"]:
        print(f"stabilizer: {identity['stabilizer_choice']}")
    print(stabilizers.format_param_table(rows))
    if cfg.get("dry_run"):
        print(f"dry run: nothing trained; the table is in {out / 'param_groups.json'}")
        return math.nan

    provenance.write(out, provenance.collect(
        overrides=identity["overrides"], model_cfg=cfg.model, model=model, tokenizer=tokenizer,
        splits=dm.splits, seeds=seeds, determinism=flags, threads=identity["threads"]))
    write_json(out / "results.json", {"status": "running", **identity})
    seed_all(seeds["seed"])
    model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps it
    module = FineTuner(model, task, groups, instantiate(cfg.optimizer.optim),
                       float(cfg.optimizer.warmup_ratio), dm.examples,
                       test_every_epoch=bool(cfg.get("test_every_epoch")))
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in NOT_TRAINER_ARGS}
    if cfg.trainer.get("compile"):
        compile_model(model)
    callbacks = list(instantiate(trainer_cfg.pop("callbacks", None) or []))  # user's, if any
    trainer = instantiate(trainer_cfg, default_root_dir=str(out), logger=_logger(cfg, out),
                          callbacks=[*callbacks, *console.progress_bar(trainer_cfg, callbacks),
                                     Resumable(out, dm)])
    hparams = loggers.log_start(trainer.loggers, cfg, {"seeds": seeds,
                                                      "threads": identity["threads"]})
    resume_from = last_checkpoint(out)
    stopping.check()
    done.update(stage="training", module=module)
    t0 = time.perf_counter()
    # The checkpoint is this run's own file, and it holds Python objects (history, preds).
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=False)
    if module.dev_is_stale():  # max_steps, val_check_interval...: the last model is unseen
        done["stage"] = "evaluating dev after training"
        trainer.validate(module, datamodule=dm, verbose=False)
    train_time = time.perf_counter() - t0
    done["stage"] = "testing"

    console.label_test(trainer, "test (last epoch)")
    trainer.test(module, datamodule=dm, verbose=False)
    test_last = module.outputs["test"]
    dev_last = module.history[-1]["dev"] if module.history else math.nan
    if module.best_is_last():  # the same weights: the same predictions
        print("test (best-on-dev weights): the last epoch's weights, scored above")
        test_best = test_last
    else:
        if module.best_state is not None:
            module.model.load_state_dict(module.best_state)
        console.label_test(trainer, "test (best-on-dev weights)")
        trainer.test(module, datamodule=dm, verbose=False)
        test_best = module.outputs["test"]
    dev_best = module.best_dev
    done["test"] = {"best": test_best["score"], "last": test_last["score"]}

    kind = dm.kind
    gold = {s: [ex["gold"] for ex in dm.examples(s)] for s in ("train", "dev", "test")}
    floor = {s: baseline(task, gold["train"], gold[s]) for s in ("dev", "test")}
    collapsed = {"dev": kind.collapsed(dev_best["preds"], task),
                 "test": kind.collapsed(test_best["preds"], task)}
    done["stage"] = "writing predictions"
    _write_predictions(out / "predictions", kind, task, dm, dev_best["preds"],
                       test_best["preds"], test_last["preds"])
    if cfg.get("save_model"):
        done["stage"] = "saving the model"
        save_model(model, tokenizer, out / "model")

    results = {
        "status": "completed", "error": None, **identity,
        "dev": {"best": dev_best["score"], "last": dev_last},
        "test": {"best": test_best["score"], "last": test_last["score"]},
        "best_epoch": module.best_epoch,
        "epochs_run": len(module.history),
        "history": module.history,
        "diagnostics": module.grad_stats.summary() if module.grad_stats else None,
        "baseline": floor, "collapsed": collapsed,
        "n_examples": {s: len(dm.examples(s)) for s in ("train", "dev", "test")},
        "lost_words": {"dev": dev_best.get("lost_words", 0),
                       "test": test_best.get("lost_words", 0)},
        "train_time_s": round(train_time, 3),
        "data_time_s": {k: round(v, 3) for k, v in dm.timing.items()},
        "tokenised_from_cache": dm.from_cache,
        "determinism": flags,
        "resumed_from": str(resume_from) if resume_from else None,
    }
    done["stage"] = "writing results"
    write_json(out / "results.json", results)
    loggers.log_final(trainer.loggers, results, trainer.global_step, hparams)
    if not cfg.get("keep_checkpoints"):
        remove_checkpoints(out)
    (out / "error.log").unlink(missing_ok=True)  # left by an interrupted try, now resumed
    _print_summary(results, out)
    return float(dev_best["score"])


def _logger(cfg: DictConfig, out: Path) -> list[Any]:
    """The loggers of `cfg.logger` (conf/logger/; CSV by default), see blurbtune.loggers."""
    return loggers.build(cfg, out)


def _write_predictions(folder: Path, kind: Any, task: Any, dm: BlurbDataModule,
                       dev: list, test: list, test_last: list) -> None:
    for name, split, preds in (("dev", "dev", dev), ("test", "test", test),
                               ("test_last", "test", test_last)):
        write_jsonl(folder / f"{name}.jsonl", (
            {"id": ex["id"], "gold": kind.to_json(ex["gold"], task),
             "pred": kind.to_json(p, task)}
            for ex, p in zip(dm.examples(split), preds, strict=True)))


def _print_summary(r: dict, out: Path) -> None:
    m = r["metric"]
    print(f"\n{r['task']} / {r['model']} / {r['stabilizer']} / seed {r['seed']}: "
          f"dev {m} best {r['dev']['best']:.4f} (epoch {r['best_epoch']}), "
          f"last {r['dev']['last']:.4f}; test best {r['test']['best']:.4f}, "
          f"last {r['test']['last']:.4f} (constant predictor: {r['baseline']['test']:.4f})")
    reasons = []
    if r["collapsed"]["test"]:
        reasons.append("its test predictions are (nearly) constant")
    if r["test"]["best"] <= r["baseline"]["test"]:
        reasons.append("its test score is no better than the constant predictor's")
    if reasons:
        print(f"WARNING: degenerate run: {' and '.join(reasons)}; it learned nothing usable.")
    print(f"run folder: {out}")

"""One fine-tuning run, or a stack of them, from a composed config to run folders.

A run's folder holds `.hydra/` (its config and overrides), `param_groups.json`,
`results.json`, `predictions/{dev,test,test_last}.jsonl`, `provenance.json`, `metrics.csv`
(Lightning's CSV log) and, with `save_model=true`, `model/`. A run whose `results.json` says
completed is not run again; one that left `checkpoints/last.ckpt` resumes from it; only
otherwise does it start fresh. Nothing in a folder changes before the run holds its lock and
has decided which of these it is; a folder that holds a run of another configuration is left
as it is and named (`same_run`).

`stack=[0,1,2,3]` trains those seeds together in one process (`blurbtune.stacking`), each
member writing the folder a single run of its seed writes (`blurbtune.members`). A single run
is a stack of one, which calls the model directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
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

from blurbtune import (
    console,
    loggers,
    members,
    provenance,
    same_run,
    stabilizers,
    stacking,
    stopping,
    sweep_outcome,
    threads,
)
from blurbtune.checkpoints import RunCheckpointIO, frozen_state
from blurbtune.datamodule import BlurbDataModule
from blurbtune.errors import ConfigError, DivergedError
from blurbtune.io import as_full_disk, write_json, write_jsonl, write_text_atomic
from blurbtune.lock import LockHeld, RunLock
from blurbtune.members import Planned
from blurbtune.models import compile_model, load_model, load_tokenizer, save_model
from blurbtune.module import FineTuner, baseline
from blurbtune.reproducibility import (
    enable_determinism,
    seed_all,
    set_matmul_precision,
)
from blurbtune.resume import (
    DamagedCheckpoint,
    Resumable,
    last_checkpoint,
    position,
    remove_checkpoints,
    set_aside,
)
from blurbtune.settings import check_settings
from blurbtune.stabilizer_config import (  # noqa: F401  (stabilizer_knobs: re-exported)
    apply_stabilizers,
    check_stabilizer,
    resolve,
    stabilizer_knobs,
    stabilizer_name,
)

log = logging.getLogger("blurbtune")

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


class Refused(ConfigError):
    """A run folder holds something this command must not skip, resume or overwrite."""


def run(cfg: DictConfig) -> float:
    """Run one fine-tuning (or the stack `cfg.stack` names) and return its best dev score (a
    stack's: its members' mean; NaN when there is none).

    Skipped, with a line saying why: a run whose result is final (completed; diverged unless
    `rerun_diverged=true`), whose folder another process holds, or when this process has been
    asked to stop (a stopping sweep). Refused, with a line naming the folder and what differs:
    a folder that holds a run of another configuration, or a record that cannot be read.
    """
    check_settings(cfg)  # as the command line does: a direct call (verify, a notebook) too
    planned = members.plan(cfg)
    if len(planned) > 1:
        stacking.check_stackable(cfg)
    if stopping.requested():
        log.warning("not started, the sweep is stopping: %s", ", ".join(
            str(p.out) for p in planned))
        return math.nan
    if rank_zero_only.rank != 0:  # a DDP process Lightning started: rank 0 holds the lock
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # and prints
            return _mean(_run_group(planned, {}))
    locks: list[RunLock] = []
    try:
        todo, scores, refusals = [], [], []
        for p in planned:
            try:
                locks.append(RunLock(p.out).acquire())
            except LockHeld as e:
                log.warning("skipping: %s", e)
                continue
            try:
                previous = _decide(p)
            except Refused as e:
                if _in_multirun() or refusals:  # a single command's first is its error line
                    log.error("%s", e)
                    sweep_outcome.note(p.out.name, "refused (its folder, above)")
                refusals.append(e)
                continue
            if previous is not None and _final(previous, p.cfg) and not p.cfg.get("dry_run"):
                scores.append(_skip(previous, p.out))
            else:
                todo.append((p, previous))
        members.write_stack_file(planned)
        for group in _groups(todo):
            with members.member_logs([p for p, _ in group]):
                scores.extend(_run_group([p for p, _ in group], dict(
                    (str(p.out), prev) for p, prev in group)))
        if refusals and not _in_multirun():
            raise refusals[0]
    finally:
        for lock in locks:
            lock.release()
    return _mean(scores)


def _mean(scores: list[float]) -> float:
    finite = [s for s in scores if not math.isnan(s)]
    return sum(finite) / len(finite) if finite else math.nan


def _decide(p: Planned) -> dict | None:
    """What `p`'s folder holds that the run must respect: returns its previous results (None
    for a new folder); raises Refused when they are unreadable or from another configuration."""
    results_path = p.out / "results.json"
    previous = None
    if results_path.exists():
        try:
            previous = json.loads(results_path.read_text(encoding="utf-8"))
            if not isinstance(previous, dict) or "status" not in previous:
                raise ValueError("no status")
        except (OSError, ValueError) as e:
            raise Refused(f"{results_path}: unreadable ({str(e).splitlines()[0]}); the folder "
                          "is left as it is: move it away (or delete the file) to run it "
                          "again") from None
    try:
        differ = same_run.differences(p.out, p.cfg)
    except ValueError as e:
        raise Refused(f"{p.out}: its recorded config is unreadable ({e}); the folder is left as "
                      "it is: move it away to run it again") from None
    if differ:
        raise Refused(f"{p.out} holds a run of another configuration ({'; '.join(differ)}); it "
                      "is left as it is: give this command its own folder (another name=, or "
                      "hydra.run.dir= / hydra.sweep.dir=) or move that one away")
    return previous


def _groups(todo: list[tuple[Planned, dict | None]]) -> list[list[tuple[Planned, dict | None]]]:
    """The runs to train together: those at the same point (new, or checkpoints at one
    position). A damaged checkpoint is set aside, with its record, and its run starts again."""
    by_position: dict[Any, list] = {}
    for p, previous in todo:
        key = None
        checkpoint = last_checkpoint(p.out)
        if checkpoint is not None and not p.cfg.get("dry_run"):
            try:
                key = position(checkpoint)
            except DamagedCheckpoint as e:
                kept = set_aside(p.out)
                log.warning("%s; it is set aside, with the record it belonged to, in %s; "
                            "the run starts again", e, kept)
                previous = None
        by_position.setdefault(key, []).append((p, previous))
    return list(by_position.values())


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


def _run_group(group: list[Planned], previous: dict[str, dict | None]) -> list[float]:
    """Train `group` (one run, or members at one point) and record each run's outcome."""
    for p in group:
        if previous.get(str(p.out)):
            log.info("previous attempt %s; running again: %s",
                     previous[str(p.out)].get("status"), p.out)
        if not (p.cfg.get("dry_run") and previous.get(str(p.out))):
            members.write_record(p)
        (p.out / "error.log").unlink(missing_ok=True)
    first = group[0].cfg
    identities = []
    thread_info = threads.apply(first.get("threads"))
    together = [p.stack["members"][p.stack["position"]] for p in group if p.stack]
    for k, p in enumerate(group):
        identity = _identity(p.cfg, p.seeds)
        identity.update(run_dir=str(p.out), overrides=list(p.overrides))
        identity["threads"] = thread_info
        if len(group) > 1:  # the runs it trained beside (one alone is a plain single run)
            identity["stack"] = {"size": len(group), "members": together,
                                 "position": k, "folder": p.stack["folder"]}
        identities.append(identity)
    console.quiet_libraries()
    # What the runs have done; _train fills it in.
    done: dict[str, Any] = {"written": set(), "started": time.time()}
    try:
        with stopping.abortable():
            return _train(group, identities, done, previous)
    except (Exception, KeyboardInterrupt, SystemExit) as raised:
        # A library's own error for a full disk (a logger's, a writer's): said as ENOSPC.
        e = as_full_disk(raised, group[0].out)
        _record_stop(e, group, identities, done, traceback.format_exc())
        interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
        if interrupted and stopping.in_pool_worker():
            # A sweep worker stays alive (see stopping.py) but starts no further run.
            stopping.request(signal.SIGTERM)
            log.warning("run %s stopped; the sweep is stopping: this worker starts no other "
                        "run", ", ".join(p.out.name for p in group))
            return [math.nan]
        if isinstance(e, SIGTERMException):  # Lightning's has exit code None: say it failed
            raise SystemExit(128 + signal.SIGTERM) from e
        if interrupted or not _in_multirun():
            if e is raised:
                raise
            raise e from raised
        _release_memory()
        if not isinstance(e, DivergedError):  # a divergence is a result
            sweep_outcome.note(", ".join(p.out.name for p in group), f"{type(e).__name__}: {e}")
        log.error("run %s %s: %s (recorded in %s; the sweep goes on)",
                  ", ".join(p.out.name for p in group),
                  "diverged" if isinstance(e, DivergedError) else "failed", e,
                  ", ".join(str(p.out / "results.json") for p in group))
        return [math.nan]


def _record_stop(e: BaseException, group: list[Planned], identities: list[dict], done: dict,
                 trace: str) -> None:
    """Record, in each run of `group` not yet written, how it stopped and what it had done (a
    member that diverged while its stack went on: that)."""
    interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
    status = "diverged" if isinstance(e, DivergedError) else (
        "interrupted" if interrupted else "failed")
    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    module = done.get("module")
    for k, (p, identity) in enumerate(zip(group, identities, strict=True)):
        if k in done["written"]:
            continue
        own_status, own_error = status, error
        kept = _progress(done, k, p.out)
        if module is not None and module.members[k].diverged is not None:
            own_status = "diverged"  # while its stack trained on
            own_error = f"DivergedError: {module.members[k].diverged}"
            kept["stage"] = "training"
        if own_status == "diverged" and not p.cfg.get("keep_checkpoints"):
            remove_checkpoints(p.out)  # a final result: nothing will resume from it
            kept["checkpoint"] = None
        try:
            write_text_atomic(p.out / "error.log", trace)
            if not p.cfg.get("dry_run"):
                write_json(p.out / "results.json", {
                    "status": own_status, "error": own_error, **identity, **kept,
                    "train_time_s": time.time() - done["started"]})
        except OSError as write_error:  # a full disk: results.json keeps saying "running",
            log.error("could not record that run %s %s in %s (%s); a rerun retries it",
                      p.out.name, own_status, p.out / "results.json", write_error)
            continue  # which a rerun treats as a stopped run
        done["written"].add(k)
        if "dev" in kept:
            log.log(logging.ERROR if own_status == "failed" else logging.WARNING,
                    "run %s %s while %s (%s); its dev scores%s are recorded in %s", p.out.name,
                    own_status, kept["stage"], own_error,
                    " and checkpoint" if kept.get("checkpoint") else "",
                    p.out / "results.json")


def _progress(done: dict, k: int, out: Path) -> dict:
    """The part of run k of a group that had been done when it stopped: the dev evaluations,
    the test scores, the checkpoint to resume from, and what it was doing (`stage`)."""
    kept: dict[str, Any] = {"stage": done.get("stage")}
    module = done.get("module")
    member = module.members[k] if module is not None else None
    if member is not None and member.history:
        kept["dev"] = {"best": member.best_score, "last": member.history[-1]["dev"]}
        kept["best_epoch"] = member.best_epoch
        kept["history"] = member.history
    if k in done.get("test", {}):
        kept["test"] = done["test"][k]
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


def build(cfg: DictConfig, seeds: dict) -> tuple[Any, BlurbDataModule, Any, dict]:
    """Tokenizer, read and tokenised data, and the model with its stabilizers applied.

    Returns (tokenizer, datamodule, model, extras) with extras holding the optimizer groups,
    the frozen and re-initialised parameter names, the determinism flags and the stabilizer
    applied (`stabilizer`, `stabilizer_knobs`, `stabilizer_choice`: see `resolve`). A dry run
    reads no data: the model and its groups come from the model and task configs alone.
    """
    tokenizer, dm, models_, extras = build_members(cfg, [seeds])
    return tokenizer, dm, models_[0], extras[0]


def build_members(cfg: DictConfig, seeds: list[dict]) -> tuple[Any, BlurbDataModule, list,
                                                                list[dict]]:
    """`build` for the members of a stack: one tokenizer and data module (each member's own
    training order), and each member's model, built as its single run builds it (its
    `init_seed` drawn before the model is loaded)."""
    task = cfg.task
    check_stabilizer(cfg.stabilizer)
    flags = enable_determinism(bool(cfg.deterministic))
    flags.update(set_matmul_precision(cfg.trainer.get("matmul_precision")))
    seed_all(seeds[0]["seed"])
    tokenizer = load_tokenizer(cfg.model, task)
    stacked = len(seeds) > 1
    dm = BlurbDataModule(
        task, tokenizer, cfg.data_dir, batch_size=int(task.batch_size),
        eval_batch_size=int(cfg.data.eval_batch_size), cache_dir=cfg.data.cache_dir,
        num_workers=int(cfg.data.num_workers), data_seed=seeds[0]["data_seed"],
        max_train_examples=cfg.data.get("max_train_examples"),
        max_eval_examples=cfg.data.get("max_eval_examples"),
        group_by_length=cfg.data.get("group_by_length", "auto"),
        stack_data_seeds=[s["data_seed"] for s in seeds] if stacked else None)
    if not cfg.get("dry_run"):
        dm.prepare()

    built, extras = [], []
    for member_seeds in seeds:
        seed_all(member_seeds["init_seed"])
        model = load_model(cfg.model, task, tokenizer)
        applied = resolve(cfg.stabilizer, model, str(task.type), _train_size(cfg, dm))
        groups, frozen, reinit = apply_stabilizers(
            model, applied.pop("sections"), float(cfg.optimizer.lr),
            float(cfg.optimizer.weight_decay), member_seeds["init_seed"])
        built.append(model)
        extras.append({"groups": groups, "frozen": frozen, "reinit": reinit,
                       "determinism": flags, "stabilizer": applied})
    if stacked:
        dm.avoid_lengths = stacking.axis_sizes(built[0].config) | {int(task.batch_size)}
    return tokenizer, dm, built, extras


def _train_size(cfg: DictConfig, dm: BlurbDataModule) -> int:
    """Training examples the run trains on; a dry run reads no data, so it takes the published
    count from the task config (Gu et al. Table 3), capped by `data.max_train_examples`."""
    if not cfg.get("dry_run"):
        return len(dm.examples("train"))
    published = int(cfg.task.blurb.counts.train)
    limit = cfg.data.get("max_train_examples")
    return min(published, int(limit)) if limit else published


def _train(group: list[Planned], identities: list[dict], done: dict,
           previous: dict[str, dict | None]) -> list[float]:
    """Train, evaluate and write each run's folder; `done` says how far it got, for `run`."""
    cfg = group[0].cfg  # the members differ in their seeds only
    task = cfg.task
    size = len(group)
    done["stage"] = "preparing data and model"
    tokenizer, dm, built, extras = build_members(cfg, [p.seeds for p in group])
    flags = extras[0]["determinism"]
    for k, (p, identity) in enumerate(zip(group, identities, strict=True)):
        identity.update(extras[k]["stabilizer"])  # what `recommended` chose, if it was asked
        # What `data.group_by_length: auto` chose: the report groups runs by what was applied.
        identity["group_by_length"] = dm.stack_grouping[k] if size > 1 else dm.group_by_length
        rows = stabilizers.describe_param_groups(built[k], extras[k]["groups"],
                                                 extras[k]["frozen"], extras[k]["reinit"])
        final = previous.get(str(p.out)) and _final(previous[str(p.out)], p.cfg)
        if not final:  # a dry run aimed at a finished run prints, and writes nothing there
            write_json(p.out / "param_groups.json", {**identity, "groups": rows})
        if k == 0:
            if identity["stabilizer_choice"]:
                print(f"stabilizer: {identity['stabilizer_choice']}")
            print(stabilizers.format_param_table(rows))
    if size > 1:
        print(f"stack of {size}: seeds {', '.join(str(p.seeds['seed']) for p in group)}, "
              "trained together; one folder each")
    if cfg.get("dry_run"):
        written = [str(p.out / "param_groups.json") for p in group
                   if not (previous.get(str(p.out)) and _final(previous[str(p.out)], p.cfg))]
        where = ", ".join(written) or "no folder (each holds a finished run, left as it is)"
        print(f"dry run: nothing trained; the table is in {where}")
        return [math.nan]

    for k, (p, identity) in enumerate(zip(group, identities, strict=True)):
        provenance.write(p.out, provenance.collect(
            overrides=identity["overrides"], model_cfg=p.cfg.model, model=built[k],
            tokenizer=tokenizer, splits=dm.splits, seeds=p.seeds, determinism=flags,
            threads=identity["threads"], fingerprint=dm.tokenizer_fingerprint))
        write_json(p.out / "results.json", {"status": "running", **identity})
    seed_all(group[0].seeds["seed"])
    stack = None
    if size > 1:
        model, stacked = stacking.stack_models(built)
        stack = stacking.Stack([p.seeds["seed"] for p in group], stacked,
                               mask=stacking.mask_form(model))
        stacking.prepare_skeleton(model, max_length=int(task.max_length))
        params = dict(model.named_parameters())
        groups = [{**g, "params": [params[n] for n in g["param_names"]]}
                  for g in extras[0]["groups"]]
        del built[1:]
    else:
        model, groups = built[0], extras[0]["groups"]
    model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps it
    module = FineTuner(model, task, groups, instantiate(cfg.optimizer.optim),
                       float(cfg.optimizer.warmup_ratio), dm.examples,
                       test_every_epoch=bool(cfg.get("test_every_epoch")), stack=stack)
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in NOT_TRAINER_ARGS}
    if cfg.trainer.get("compile"):
        compile_model(model)
    callbacks = list(instantiate(trainer_cfg.pop("callbacks", None) or []))  # user's, if any
    run_loggers = [loggers.build(p.cfg, p.out, finish_open=k == 0, stacked=size > 1)
                   for k, p in enumerate(group)]
    checkpoint_io = RunCheckpointIO([p.out for p in group], stack.stacked if stack else None,
                                    module.alive, lambda: frozen_state(module))
    resumable = Resumable(group[0].out, dm, checkpoint_io, cfg.get("checkpoint_every", "auto"))
    trainer = instantiate(
        trainer_cfg, default_root_dir=str(group[0].out),
        logger=run_loggers[0] if size == 1 else [
            loggers.for_member(lg, k) for k, own in enumerate(run_loggers) for lg in own],
        callbacks=[*callbacks, *console.progress_bar(trainer_cfg, callbacks), resumable])
    # Before fit: Lightning restores a checkpoint through it.
    checkpoint_io.device_type = trainer.strategy.root_device.type
    trainer.strategy.checkpoint_io = checkpoint_io
    hparams = [loggers.log_start(own, p.cfg, {"seeds": p.seeds, "threads": identity["threads"]})
               for own, p, identity in zip(run_loggers, group, identities, strict=True)]
    resume_from = last_checkpoint(group[0].out)  # read by checkpoint_io, member by member
    stopping.check()
    done.update(stage="training", module=module)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
    if module.dev_is_stale():  # max_steps, val_check_interval...: the last model is unseen
        done["stage"] = "evaluating dev after training"
        trainer.validate(module, datamodule=dm, verbose=False)
    train_time = time.perf_counter() - t0
    done["stage"] = "testing"

    console.label_test(trainer, "test (last epoch)")
    trainer.test(module, datamodule=dm, verbose=False)
    test_last = list(module.outputs["test"])
    alive = module.alive()
    if all(module.best_is_last(k) for k in alive):  # the same weights: the same predictions
        print("test (best-on-dev weights): the last epoch's weights, scored above")
        test_best = test_last
    else:
        module.load_best_weights()
        console.label_test(trainer, "test (best-on-dev weights)")
        trainer.test(module, datamodule=dm, verbose=False)
        test_best = list(module.outputs["test"])
    done["test"] = {k: {"best": test_best[k]["score"], "last": test_last[k]["score"]}
                    for k in alive}

    gold = {s: [ex["gold"] for ex in dm.examples(s)] for s in ("train", "dev", "test")}
    floor = {s: baseline(task, gold["train"], gold[s]) for s in ("dev", "test")}
    scores = []
    for k, (p, identity) in enumerate(zip(group, identities, strict=True)):
        member = module.members[k]
        if member.diverged is not None:
            continue  # recorded below, as a single run that diverged is
        dev_best = member.best_dev
        collapsed = {"dev": dm.kind.collapsed(dev_best["preds"], task),
                     "test": dm.kind.collapsed(test_best[k]["preds"], task)}
        done["stage"] = "writing predictions"
        _write_predictions(p.out / "predictions", dm.kind, task, dm, dev_best["preds"],
                           test_best[k]["preds"], test_last[k]["preds"])
        if p.cfg.get("save_model"):
            done["stage"] = "saving the model"
            own = model if stack is None else stacking.unstacked_copy(model, stack.stacked, k)
            save_model(own, tokenizer, p.out / "model")
        results = {
            "status": "completed", "error": None, **identity,
            "dev": {"best": dev_best["score"], "last": member.history[-1]["dev"]},
            "test": {"best": test_best[k]["score"], "last": test_last[k]["score"]},
            "best_epoch": member.best_epoch,
            "epochs_run": len(member.history),
            "history": member.history,
            "diagnostics": member.grad_stats.summary() if member.grad_stats else None,
            "baseline": floor, "collapsed": collapsed,
            "n_examples": {s: len(dm.examples(s)) for s in ("train", "dev", "test")},
            "lost_words": {"dev": dev_best.get("lost_words", 0),
                           "test": test_best[k].get("lost_words", 0)},
            "train_time_s": round(train_time, 3),
            "data_time_s": {key: round(v, 3) for key, v in dm.timing.items()},
            "tokenised_from_cache": dm.from_cache,
            "determinism": flags,
            "resumed_from": str(p.out / "checkpoints" / "last.ckpt") if resume_from else None,
        }
        done["stage"] = "writing results"
        write_json(p.out / "results.json", results)
        done["written"].add(k)
        loggers.log_final(run_loggers[k], results, trainer.global_step, hparams[k])
        if not p.cfg.get("keep_checkpoints"):
            remove_checkpoints(p.out)
        (p.out / "error.log").unlink(missing_ok=True)  # left by an interrupted try, resumed
        _print_summary(results, p.out)
        scores.append(float(dev_best["score"]))
    diverged = [k for k in range(size) if module.members[k].diverged is not None]
    if diverged:
        _record_stop(DivergedError("a member diverged"), group, identities, done,
                     "a member of a stack diverged while the others trained on\n")
        for k in diverged:
            loggers.finish(run_loggers[k])
            log.warning("run %s diverged: %s (the stack's other runs went on)",
                        group[k].out.name, module.members[k].diverged)
    if stack is not None:
        print(console.stack_summary([p.seeds["seed"] for p in group], module, task.metric))
    return scores


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
          f"dev {m} best {r['dev']['best']:.4f} (epoch {r['best_epoch'] + 1}), "
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

"""Throughput of blurbtune against a plain Hugging Face `Trainer`, and against the hardware.

One invocation fine-tunes each (model, task) three ways, with the same model, data subset,
batch size, epochs, learning rate, max length, seed and torch threads:

  hf-maxpad   the `Trainer` padding every example to the task's max_length (BLURB's scripts)
  hf-dynamic  the `Trainer` with dynamic padding (DataCollatorWithPadding / ...TokenClassification)
  blurbtune   `blurbtune.run.run` on the composed config (dev every epoch, test best and last)

Each way runs in its own process, so peak memory is its own. Training throughput is timed over
training steps only (from each epoch's start to its last optimizer step); evaluation is timed
and reported separately, since blurbtune evaluates more (dev each epoch, test twice unless the
best weights are the last). MFU is 6 x parameters x real (non-pad) training tokens/s over
the peak matmul FLOP/s measured in the same run (fp32 on CPU, bf16 on a GPU). "sweep" times
the data preparation of a sweep's first run (cold cache) and its second run (warm cache),
through blurbtune's own DataModule.

    python benchmarks/bench_train.py                        # tiny + minilm on 3 tasks, CPU
    python benchmarks/bench_train.py --models minilm --tasks gad --train-examples 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WAYS = ("hf-maxpad", "hf-dynamic", "blurbtune")
# Opt-in (--ways): blurbtune with trainer.compile=true, its compile time inside its training time.
OPTIONAL_WAYS = ("blurbtune-compile",)


# --------------------------------------------------------------------------- shared helpers

def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_matmul_flops(device: str, n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-`repeats` FLOP/s of an n x n matmul (fp32 on CPU, bf16 on a GPU)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"flops": 2 * n**3 / best, "n": n, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "torch_threads": torch.get_num_threads()}


def _compose(args: argparse.Namespace, extra: list[str] = ()) -> Any:
    from blurbtune.config import compose

    return compose([f"model={args.model}", f"task={args.task}", f"seed={args.seed}",
                    f"data_dir={args.data_dir}", f"trainer={args.trainer}",
                    f"trainer.max_epochs={args.epochs}", *extra])


def _memory() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def flop_parameters(model: Any) -> int:
    """Parameters that cost matmul FLOPs: all but the embedding tables (lookups), as the
    scaling literature counts N in 6 x N x tokens."""
    import torch

    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def _subset(split: Any, limit: int | None) -> list[dict]:
    return split.examples[:limit] if limit else split.examples


# --------------------------------------------------------------------------- the HF Trainer

def hf_compute_metrics(task: Any) -> Any:
    """compute_metrics as a user writes it: Pearson, F1 of the positive class, or seqeval F1."""
    import numpy as np

    def similarity(p: Any) -> dict:
        from scipy.stats import pearsonr

        return {"pearson": float(pearsonr(p.predictions.reshape(-1), p.label_ids)[0])}

    def relation(p: Any) -> dict:
        from sklearn.metrics import f1_score

        return {"f1": float(f1_score(p.label_ids, p.predictions.argmax(-1), average="micro",
                                     labels=[i for i in range(len(task.labels))
                                             if task.labels[i] != task.get("negative_label")]))}

    def tagging(p: Any) -> dict:
        from seqeval.metrics import f1_score

        names = list(task.labels)
        preds = p.predictions.argmax(-1)
        gold = [[names[t] for t in row if t != -100] for row in p.label_ids]
        pred = [[names[t] for t, g in zip(prow, grow, strict=True) if g != -100]
                for prow, grow in zip(preds, p.label_ids, strict=True)]
        return {"f1": float(f1_score(gold, pred))}

    def accuracy(p: Any) -> dict:
        return {"accuracy": float(np.mean(p.predictions.argmax(-1) == p.label_ids))}

    return {"similarity": similarity, "relation": relation, "ner": tagging,
            "pico": tagging}.get(str(task.type), accuracy)


def hf_encode(examples: list[dict], tokenizer: Any, task: Any, pad: bool,
              pad_to: int | None = None) -> Any:
    """Tokenise with `datasets.map`, as the transformers examples do; with `pad`, every example
    is padded (and truncated) to `pad_to`, else to the task's max_length."""
    import datasets

    padding = "max_length" if pad else False
    max_length = int(pad_to) if pad and pad_to else int(task.max_length)
    if task.type in ("ner", "pico"):
        def encode(batch: dict) -> dict:
            enc = tokenizer(batch["words"], is_split_into_words=True, truncation=True,
                            max_length=max_length, padding=padding)
            labels = []
            for i, tags in enumerate(batch["gold"]):
                seen, row = set(), []
                for w in enc.word_ids(i):
                    row.append(-100 if w is None or w in seen else tags[w])
                    if w is not None:
                        seen.add(w)
                labels.append(row)
            enc["labels"] = labels
            return enc
        columns = {k: [ex[k] for ex in examples] for k in ("words", "gold")}
    else:
        def encode(batch: dict) -> dict:
            pair = batch.get("text_pair")
            enc = tokenizer(batch["text"], pair, truncation=True, max_length=max_length,
                            padding=padding)
            enc["labels"] = batch["gold"]
            return enc
        columns = {k: [ex[k] for ex in examples] for k in ("text", "text_pair", "gold")
                   if k in examples[0]}
    raw = datasets.Dataset.from_dict(columns)
    return raw.map(encode, batched=True, remove_columns=raw.column_names)


def run_hf(args: argparse.Namespace, pad: bool) -> dict:
    import torch
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from blurbtune.data import read_splits
    from blurbtune.models import load_model, load_tokenizer

    cfg = _compose(args)
    task = cfg.task
    tokenizer = load_tokenizer(cfg.model, task)
    t0 = time.perf_counter()
    splits = read_splits(task, cfg.data_dir)
    limits = {"train": args.train_examples, "dev": args.eval_examples, "test": args.eval_examples}
    data = {s: hf_encode(_subset(splits[s], limits[s]), tokenizer, task, pad,
                         args.maxpad_length) for s in splits}
    data_s = time.perf_counter() - t0

    set_seed(args.seed)
    model = load_model(cfg.model, task, tokenizer)
    token = task.type in ("ner", "pico")
    collator = default_data_collator if pad else (
        DataCollatorForTokenClassification(tokenizer) if token
        else DataCollatorWithPadding(tokenizer))
    gpu = _device() == "cuda"
    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "hf"),
        per_device_train_batch_size=int(task.batch_size),
        per_device_eval_batch_size=int(task.batch_size), learning_rate=float(cfg.optimizer.lr),
        weight_decay=float(cfg.optimizer.weight_decay),
        warmup_steps=float(cfg.optimizer.warmup_ratio),
        max_grad_norm=float(cfg.optimizer.gradient_clip_val), num_train_epochs=args.epochs,
        eval_strategy="epoch", save_strategy="no", logging_steps=10, report_to="none",
        seed=args.seed, use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),
        tf32=gpu or None, dataloader_num_workers=0, disable_tqdm=args.quiet)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.train_s, self.start, self.last = 0.0, 0.0, 0.0

        def on_epoch_begin(self, *a: Any, **k: Any) -> None:
            self.start = self.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.last = time.perf_counter()

        def on_epoch_end(self, *a: Any, **k: Any) -> None:
            self.train_s += self.last - self.start

    timer = Timer()
    trainer = Trainer(model=model, args=targs, train_dataset=data["train"],
                      eval_dataset=data["dev"], data_collator=collator,
                      compute_metrics=hf_compute_metrics(task), callbacks=[timer])
    t1 = time.perf_counter()
    trainer.train()
    fit_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    trainer.predict(data["test"])
    test_s = time.perf_counter() - t2
    dev_evals = [h for h in trainer.state.log_history if "eval_runtime" in h]
    eval_s = sum(h["eval_runtime"] for h in dev_evals) + test_s
    n_train = len(data["train"])
    tokens = sum(sum(m) for m in data["train"]["attention_mask"])
    dev_score = next((v for k, v in dev_evals[-1].items() if k.startswith("eval_")
                      and k not in ("eval_loss", "eval_runtime", "eval_samples_per_second",
                                    "eval_steps_per_second", "epoch")), None) if dev_evals else None
    return {
        "train_examples": n_train * args.epochs, "train_tokens": tokens * args.epochs,
        "train_s": timer.train_s,
        "eval_examples": len(data["dev"]) * len(dev_evals) + len(data["test"]),
        "eval_s": eval_s, "data_s": data_s, "fit_and_eval_s": fit_s + test_s,
        "parameters": flop_parameters(model),
        "dev_score": dev_score,
        "padded_length": (args.maxpad_length or int(task.max_length)) if pad else None,
        **_memory()}


# --------------------------------------------------------------------------- blurbtune

TIMERS: list = []


def make_timer() -> Any:
    """A Lightning callback timing training steps and evaluation (built by Hydra from
    `trainer.callbacks`; kept in TIMERS so the benchmark can read it afterwards)."""
    import pytorch_lightning as pl
    import torch

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.train_s = self.eval_s = 0.0
            self.start = self.last = self.eval_start = 0.0
            self.examples = self.tokens = self.eval_examples = self.parameters = 0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.parameters = flop_parameters(module.model)

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.start = self.last = now()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.last = now()
            self.examples += int(batch["input_ids"].shape[0])
            self.tokens += int(batch["attention_mask"].sum())

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.train_s += self.last - self.start

        def _eval_start(self, *a: Any) -> None:
            self.eval_start = now()

        def _eval_end(self, *a: Any) -> None:
            self.eval_s += now() - self.eval_start

        def _eval_batch(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                        *a: Any) -> None:
            self.eval_examples += int(batch["input_ids"].shape[0])

        on_validation_start = on_test_start = _eval_start
        on_validation_end = on_test_end = _eval_end
        on_validation_batch_end = on_test_batch_end = _eval_batch

    TIMERS.append(Timer())
    return TIMERS[-1]


def run_blurbtune(args: argparse.Namespace, compiled: bool = False) -> dict:
    from omegaconf import open_dict

    from blurbtune.run import run

    compile_ = ["trainer.compile=true"] if compiled else []  # code before the key had none
    cfg = _compose(args, [*compile_, f"data.max_train_examples={args.train_examples}",
                          f"data.max_eval_examples={args.eval_examples}",
                          f"data.cache_dir={Path(args.workdir) / 'cache'}"])
    with open_dict(cfg):
        if "threads" in cfg:  # else every CPU, not --threads (code before the key: the child's)
            cfg.threads = args.threads
        cfg.run_dir = str(Path(args.workdir) / "run")
        cfg.trainer.callbacks = [{"_target_": f"{__name__}.make_timer"}]
        if args.quiet:
            cfg.trainer.enable_progress_bar = False
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    results = json.loads((Path(cfg.run_dir) / "results.json").read_text())
    timer = TIMERS[-1]
    data_s = sum(results["data_time_s"].values())
    return {
        "train_examples": timer.examples, "train_tokens": timer.tokens, "train_s": timer.train_s,
        "eval_examples": timer.eval_examples, "eval_s": timer.eval_s, "data_s": data_s,
        "fit_and_eval_s": wall - data_s, "parameters": timer.parameters,
        "dev_score": results["dev"]["last"],
        "tokenised_from_cache": results["tokenised_from_cache"],
        **_memory()}


def run_sweep(args: argparse.Namespace) -> dict:
    """Data preparation of a sweep's first and second run, on the full splits, fresh cache."""
    from blurbtune.datamodule import BlurbDataModule
    from blurbtune.models import load_tokenizer

    cfg = _compose(args)
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    out = {}
    for run_no in ("first", "second"):
        dm = BlurbDataModule(cfg.task, tokenizer, cfg.data_dir, batch_size=1, eval_batch_size=1,
                             cache_dir=str(Path(args.workdir) / "cache"))
        dm.prepare()
        out[run_no] = {"data_s": sum(dm.timing.values()), **dm.timing,
                       "from_cache": all(dm.from_cache.values())}
    out["ratio"] = out["second"]["data_s"] / out["first"]["data_s"]
    out["train_rows"] = len(dm.encoded["train"])
    return out


# --------------------------------------------------------------------------- the driver

def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = {"hf-maxpad": lambda: run_hf(args, pad=True),
          "hf-dynamic": lambda: run_hf(args, pad=False),
          "blurbtune": lambda: run_blurbtune(args),
          "blurbtune-compile": lambda: run_blurbtune(args, compiled=True),
          "sweep": lambda: run_sweep(args)}[args.child]
    result = fn()
    result["torch_threads"] = torch.get_num_threads()
    Path(args.child_out).write_text(json.dumps(result))


def spawn(args: argparse.Namespace, way: str, model: str, task: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        out = Path(work) / "result.json"
        cmd = [sys.executable, __file__, "--child", way, "--model", model, "--task", task,
               "--workdir", work, "--child-out", str(out), "--data-dir", args.data_dir,
               "--train-examples", str(args.train_examples), "--eval-examples",
               str(args.eval_examples), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--threads", str(args.threads), "--trainer", args.trainer,
               "--maxpad-length", str(args.maxpad_length)]
        if args.quiet:
            cmd.append("--quiet")
        log = Path(args.out) / "logs" / f"{model}-{task}-{way}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
        if proc.returncode:
            print(f"{model:7s} {task:13s} {way:10s} FAILED (exit {proc.returncode}); see {log}",
                  flush=True)
            return None
        return json.loads(out.read_text())


def derive(r: dict, peak: float) -> dict:
    r["train_ex_s"] = r["train_examples"] / r["train_s"]
    r["train_tok_s"] = r["train_tokens"] / r["train_s"]
    r["eval_ex_s"] = r["eval_examples"] / r["eval_s"]
    r["mfu"] = 6 * r["parameters"] * r["train_tok_s"] / peak
    return r


def table(rows: list[dict]) -> str:
    gpu = any("peak_gpu_mb" in r for r in rows)
    head = ("| model | task | way | train ex/s | train tok/s | eval ex/s | MFU | peak RSS MB | "
            + ("peak GPU MB | " if gpu else "")
            + "data s | train s | eval s | x dynamic | x maxpad |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['task']} | {r['way']} | {r['train_ex_s']:.1f} | "
            f"{r['train_tok_s']:.0f} | {r['eval_ex_s']:.1f} | {100 * r['mfu']:.2f}% | "
            f"{r['peak_rss_mb']:.0f} | "
            + (f"{r.get('peak_gpu_mb', 0):.0f} | " if gpu else "")
            + f"{r['data_s']:.2f} | {r['train_s']:.1f} | "
            f"{r['eval_s']:.1f} | "
            f"{r.get('x_dynamic', 1.0):.2f} | {r.get('x_maxpad', 1.0):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,minilm")
    p.add_argument("--tasks", default="biosses,gad,ncbi_disease")
    p.add_argument("--ways", default=",".join(WAYS),
                   help=f"comma-separated, in order, from {', '.join(WAYS + OPTIONAL_WAYS)}")
    p.add_argument("--data-dir", default=os.environ.get("BLURB_DATA_DIR")
                   or str(ROOT / "tests" / "fixtures" / "blurb"))
    p.add_argument("--train-examples", type=int, default=128,
                   help="first N training examples of each task (0: all)")
    p.add_argument("--eval-examples", type=int, default=64,
                   help="first N dev and test examples (0: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--maxpad-length", type=int, default=0,
                   help="length hf-maxpad pads to (0: the task's max_length; BLURB's scripts "
                        "use 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--trainer", default=None, help="blurbtune trainer preset (default: cpu/gpu)")
    p.add_argument("--no-sweep", action="store_true", help="skip the tokenise-once measurement")
    p.add_argument("--out", default="outputs/benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bars in the logs")
    for hidden in ("--child", "--model", "--task", "--workdir", "--child-out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.threads = args.threads or torch.get_num_threads()
    args.trainer = args.trainer or ("gpu" if _device() == "cuda" else "cpu")
    if args.child:
        child(args)
        return

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    peak = peak_matmul_flops(_device())
    print(f"peak matmul: {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, n={peak['n']}, "
          f"{peak['device']}, {peak['torch_threads']} threads); data: {args.data_dir}", flush=True)
    rows, sweeps, failed = [], [], []
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            by_way = {}
            for way in args.ways.split(","):
                result = spawn(args, way, model, task)
                if result is None:  # said above; the other ways and tasks still run
                    failed.append(f"{model}/{task}/{way}")
                    continue
                r = derive(result, peak["flops"])
                r.update(model=model, task=task, way=way)
                by_way[way] = r
                print(f"{model:7s} {task:13s} {way:10s} train {r['train_ex_s']:7.1f} ex/s "
                      f"{r['train_tok_s']:8.0f} tok/s  eval {r['eval_ex_s']:7.1f} ex/s  "
                      f"data {r['data_s']:.2f}s train {r['train_s']:.1f}s eval {r['eval_s']:.1f}s  "
                      f"RSS {r['peak_rss_mb']:.0f} MB  MFU {100 * r['mfu']:.2f}%", flush=True)
            for r in by_way.values():
                for base, key in (("hf-dynamic", "x_dynamic"), ("hf-maxpad", "x_maxpad")):
                    if base in by_way:
                        r[key] = r["train_ex_s"] / by_way[base]["train_ex_s"]
            rows.extend(by_way.values())
            if not args.no_sweep:
                s = spawn(args, "sweep", model, task)
                if s is None:
                    failed.append(f"{model}/{task}/sweep")
                    continue
                s.update(model=model, task=task)
                sweeps.append(s)
                print(f"{model:7s} {task:13s} sweep      data prep first run "
                      f"{s['first']['data_s']:.2f}s, second {s['second']['data_s']:.3f}s "
                      f"({100 * s['ratio']:.1f}%), second from cache: {s['second']['from_cache']}",
                      flush=True)
    total = time.perf_counter() - started
    md = [f"peak matmul {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, {peak['device']}, "
          f"{args.threads} torch threads); {args.train_examples or 'all'} training examples x "
          f"{args.epochs} epochs, {args.eval_examples or 'all'} dev/test examples; "
          f"benchmark wall time {total:.0f}s", "", table(rows)]
    if sweeps:
        md += ["", "| model | task | first run data s | second run data s | second/first | "
               "from cache |", "|---|---|---|---|---|---|"]
        md += [f"| {s['model']} | {s['task']} | {s['first']['data_s']:.2f} | "
               f"{s['second']['data_s']:.3f} | {100 * s['ratio']:.1f}% | "
               f"{s['second']['from_cache']} |" for s in sweeps]
    if failed:
        md += ["", f"FAILED (see {Path(args.out) / 'logs'}): {', '.join(failed)}"]
    text = "\n".join(md)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text + "\n")
    (out / "benchmark.json").write_text(json.dumps(
        {"peak_matmul": peak, "settings": {k: v for k, v in vars(args).items()
                                           if not k.startswith("child") and v is not None},
         "runs": rows, "sweep": sweeps, "wall_s": total}, indent=2))
    print(f"\nwritten: {out / 'benchmark.md'}, {out / 'benchmark.json'}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

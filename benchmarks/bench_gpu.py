"""Stacked seeds on one GPU: fused against eager attention, against the matmul ceiling, end to end.

One invocation, every figure side by side, one JSON file (issue 24):

  matmul   the bf16 matmul rate of the device (8192^2, best of 5): the ceiling for "share"
  minilm   a stack of 10 MiniLM-shaped members (all-MiniLM-L6-v2's config, random weights) at
           PubMedQA's shape (batch 16, length 512) and BIOSSES' (batch 16, length 128): ms per
           training step, training ex/s and peak memory with eager attention under vmap
           (`stacking.prepare_skeleton(..., "eager")`, as before issue 24) and with the fused
           one (a stack's default on a GPU), attention dropout on (0.1, as trained); then 20
           steps of each from the same weights and batches with dropout off, and the largest
           difference between their members' losses after them; and the same shapes as
           separate runs one after another (one plain model, sdpa, as a single run trains: K
           runs take K times a run)
  bert     a BERT-base shape (random weights) at K = 1 (a single run), 4 and 10 and lengths 128
           and 512, batch 16, fused: ex/s, TFLOP/s and the share of the measured matmul rate,
           against the same runs one after another
  preset   the BIOSSES study preset end to end, stacked, all stacks at once:
           `train.py -m experiment=study_biosses trainer=gpu hydra/sweeper=stacked
           hydra.sweeper.size=auto hydra/launcher=parallel hydra.launcher.n_jobs=5`: the wall
           time from the command to its end (the last results.json) and to the first training
           step of the first and of the last stack

A training step is forward, backward, AdamW (bf16 autocast and TF32 on a GPU, as `trainer=gpu`;
fp32 on a CPU), timed with the device synchronised, after warm-up steps. FLOPs of a step:
6 x N x tokens (N: parameters but the embedding tables) + 12 x layers x hidden x length x tokens
(attention's two matmuls, forward and backward).

On the H200 (15 minutes of device time a session, 10 a command): first, on this machine,
`python scripts/pack_for_gpu.py` (MiniLM, the BLURB folders incl. BIOSSES, the wheels), then

    python benchmarks/bench_gpu.py --out $OUT/bench_gpu.json     # on the GPU machine, < 9 min

(with the device tool: carry `.gpu` and `.whl`, timeout_s 600),

which installs `.whl/` into /tmp/site and restores MiniLM as scripts/gpu_study.py does (the
preset needs them; `--no-setup` skips it). `--budget` (default 500 s) is checked before each
measurement: a part that would not fit is skipped and named in the output, never cut short.
`--dry` runs every part with tiny shapes on the CPU (the test suite does) in well under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src", ROOT / "benchmarks", ROOT / "scripts"):
    sys.path.insert(0, str(_path))

# all-MiniLM-L6-v2's config.json, and BERT-base's (bert-base-uncased).
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
FULL = {"members": 10, "minilm": MINILM, "minilm_shapes": {"pubmedqa": (16, 512),
                                                           "biosses": (16, 128)},
        "bert": BERT_BASE, "bert_members": (1, 4, 10), "bert_lengths": (128, 512), "rows": 16,
        "warmup": 3, "steps": 10, "compare_steps": 20}
DRY = {"members": 2, "minilm": TINY, "minilm_shapes": {"pubmedqa": (2, 24), "biosses": (2, 12)},
       "bert": TINY, "bert_members": (1, 2), "bert_lengths": (8, 16), "rows": 2,
       "warmup": 1, "steps": 2, "compare_steps": 3}
T0 = time.monotonic()


def say(*parts: object) -> None:
    print(f"[bench_gpu {time.monotonic() - T0:5.0f}s]", *parts, flush=True)


class Budget:
    """Seconds left of `total` from the script's start; `fits(need)` says whether a
    measurement predicted to take `need` seconds still fits, and records it where not."""

    def __init__(self, total: float) -> None:
        self.total, self.skipped = total, []

    def left(self) -> float:
        return self.total - (time.monotonic() - T0)

    def fits(self, what: str, need: float) -> bool:
        if need <= self.left():
            return True
        self.skipped.append(f"{what}: needs ~{need:.0f}s, {self.left():.0f}s left")
        say("SKIPPED", self.skipped[-1])
        return False


ERRORS: list[dict] = []


def guarded(what: str, measure: Any, *args: Any) -> Any:
    """`measure(*args)`, or None where it raised: the error is printed, kept for the JSON
    (`errors`), and the script goes on to the next measurement."""
    import traceback

    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the rest
        ERRORS.append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]})
        say(f"FAILED {what}: {type(exc).__name__}: {exc}"[:600])
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        return None


# --------------------------------------------------------------------------- measurements

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model(shape: dict, seed: int, dropout: float, attention_dropout: float | None = None) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    attention_dropout = dropout if attention_dropout is None else attention_dropout
    config = BertConfig(**shape, attention_probs_dropout_prob=attention_dropout,
                        hidden_dropout_prob=dropout, num_labels=3)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def _batches(members: int, rows: int, length: int, vocab: int, n: int, device: str) -> list:
    """`n` training batches, ``[members, rows, length]`` (None: one run's ``[rows, length]``)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shape = (members, rows, length) if members else (rows, length)
    return [{"input_ids": torch.randint(3, vocab, shape, generator=gen).to(device),
             "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
             "labels": torch.randint(0, 3, shape[:-1], generator=gen).to(device)}
            for _ in range(n)]


class Trainee:
    """A stack of `members` (None: one plain model, a single run) ready to step."""

    def __init__(self, shape: dict, members: int | None, attention: str, dropout: float,
                 device: str, attention_dropout: float | None = None) -> None:
        import torch

        from blurbtune import stacking

        self.device, self.members = device, members
        if members:
            self.model, self.stacked = stacking.stack_models(
                [_model(shape, k, dropout, attention_dropout) for k in range(members)])
            self.attention = stacking.prepare_skeleton(self.model, attention)
            self.gens = [torch.Generator(device=device).manual_seed(k) for k in range(members)]
        else:
            self.model = _model(shape, 0, dropout, attention_dropout)
            self.attention = "sdpa (single run)"
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters()
                                            if p.requires_grad], lr=1e-4)
        self.rows = 0

    def step(self, batch: dict) -> Any:
        import torch

        from blurbtune import stacking

        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            if self.members:
                loss = stacking.forward(self.model, self.stacked, batch, False, self.gens).loss
            else:
                loss = self.model(**batch).loss
        loss.sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rows += batch["input_ids"].shape[:-1].numel()
        return loss.detach()


def time_steps(trainee: Trainee, batches: list, warmup: int) -> dict:
    """ms a step (median over the timed steps), ex/s and peak device memory."""
    import torch

    for batch in batches[:warmup]:
        trainee.step(batch)
    _sync(trainee.device)
    if trainee.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, rows = [], 0
    for batch in batches[warmup:]:
        t0 = time.perf_counter()
        trainee.step(batch)
        _sync(trainee.device)
        times.append(time.perf_counter() - t0)
        rows += batch["input_ids"].shape[:-1].numel()
    ms = statistics.median(times) * 1e3
    out = {"attention": trainee.attention, "ms_per_step": round(ms, 2),
           "ex_per_s": round(rows / sum(times), 1), "timed_steps": len(times)}
    if trainee.device == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _release(*trainees: Trainee) -> None:
    import gc

    import torch

    for t in trainees:
        del t.model, t.optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_rate(device: str, dry: bool) -> dict:
    from bench_train import peak_matmul_flops

    rate = peak_matmul_flops(device, n=256 if dry else 2048, repeats=2 if dry else 5)
    say(f"matmul: {rate['flops'] / 1e12:.1f} TFLOP/s ({rate['dtype']}, {rate['n']}^2)")
    return rate


def minilm_part(p: dict, device: str, budget: Budget) -> list[dict]:
    """Eager against fused attention for a stack of `members`, at each shape; and separate."""
    rows_out = []
    K, shape = p["members"], p["minilm"]
    for name, (rows, length) in p["minilm_shapes"].items():
        batches = _batches(K, rows, length, shape["vocab_size"], p["warmup"] + p["steps"],
                           device)
        row: dict[str, Any] = {"shape": name, "members": K, "rows": rows, "length": length}
        guess = 60.0 if device == "cuda" and length >= 512 else 20.0
        for attention in ("eager", "fused"):
            if not budget.fits(f"minilm {name} {attention}", guess):
                continue
            got = guarded(f"minilm {name} {attention}", _timed, shape, K, attention, batches, p)
            if got is not None:
                row[attention] = got
                say(f"minilm {name} K={K} {attention}: {got}")
        if "eager" in row and "fused" in row:
            row["fused_speedup"] = round(row["eager"]["ms_per_step"]
                                         / row["fused"]["ms_per_step"], 2)
        if budget.fits(f"minilm {name} separate", guess / 4):
            one = _batches(0, rows, length, shape["vocab_size"], p["warmup"] + p["steps"], device)
            got = guarded(f"minilm {name} separate", _timed, shape, None, "sdpa", one, p)
            if got is not None:
                row["separate"] = got
            if "fused" in row and "separate" in row:
                row["fused_x_separate"] = round(row["fused"]["ex_per_s"]
                                                / row["separate"]["ex_per_s"], 2)
        if budget.fits(f"minilm {name} loss after {p['compare_steps']} steps", 2 * guess):
            got = guarded(f"minilm {name} losses", compare_losses, shape, K, rows, length, p,
                          device)
            if got is not None:
                row["loss_after_steps"] = got
        rows_out.append(row)
    return rows_out


def _timed(shape: dict, members: int | None, attention: str, batches: list, p: dict) -> dict:
    trainee = Trainee(shape, members, attention, 0.1, batches[0]["input_ids"].device.type)
    try:
        return time_steps(trainee, batches, p["warmup"])
    finally:
        _release(trainee)


def compare_losses(shape: dict, members: int, rows: int, length: int, p: dict,
                   device: str) -> dict:
    """Train eager and fused from the same weights on the same batches, dropout off (with it on
    their GPU masks differ by design); the members' losses at the last step."""
    n = p["compare_steps"]
    batches = _batches(members, rows, length, shape["vocab_size"], n, device)
    losses = {}
    for attention in ("eager", "fused"):
        trainee = Trainee(shape, members, attention, 0.0, device)
        for batch in batches:
            loss = trainee.step(batch)
        losses[attention] = loss.float().cpu()
        _release(trainee)
    diff = float((losses["eager"] - losses["fused"]).abs().max())
    say(f"minilm L={length}: after {n} steps, largest |eager - fused| member loss {diff:.2e}")
    return {"steps": n, "max_abs_diff": diff, "eager": losses["eager"].tolist(),
            "fused": losses["fused"].tolist()}


def step_flops(shape: dict, tokens: int, length: int, params: int) -> float:
    return 6.0 * params * tokens + 12.0 * shape["num_hidden_layers"] * shape["hidden_size"] \
        * length * tokens


def bert_part(p: dict, device: str, rate: float, budget: Budget) -> list[dict]:
    """BERT-base shape: a single run (K = 1) and fused stacks, each built once and timed at
    every length, against the runs one after another (K single runs: the single run's ex/s)."""
    from bench_train import flop_parameters

    out, shape = [], p["bert"]
    params = flop_parameters(_model(shape, 0, 0.1))
    separate: dict[int, float] = {}
    for K in p["bert_members"]:
        guess = (45.0 * K / 10 + 10) if device == "cuda" else 15.0
        if not budget.fits(f"bert K={K}", guess):
            continue
        got = guarded(f"bert K={K}", _bert_member_count, shape, K, p, params, rate, separate,
                      device)
        out.extend(got or [])
    return sorted(out, key=lambda r: (r["length"], r["members"]))


def _bert_member_count(shape: dict, K: int, p: dict, params: int, rate: float,
                       separate: dict[int, float], device: str) -> list[dict]:
    out, rows = [], p["rows"]
    trainee = Trainee(shape, K if K > 1 else None, "fused", 0.1, device)
    try:
        for length in p["bert_lengths"]:
            batches = _batches(K if K > 1 else 0, rows, length, shape["vocab_size"],
                               p["warmup"] + p["steps"], device)
            got = time_steps(trainee, batches, p["warmup"])
            tflops = step_flops(shape, K * rows * length, length, params) \
                / (got["ms_per_step"] / 1e3) / 1e12
            got.update({"length": length, "members": K, "rows": rows,
                        "tflop_per_s": float(f"{tflops:.4g}"),
                        "share_of_matmul": float(f"{tflops * 1e12 / rate:.4g}")})
            if K == 1:
                separate[length] = got["ex_per_s"]
            got["separate_ex_per_s"] = separate.get(length)
            got["x_separate"] = round(got["ex_per_s"] / separate[length], 2) \
                if length in separate else None
            say(f"bert L={length} K={K}: {got}")
            out.append(got)
    finally:
        _release(trainee)
    return out


def preset_part(args: argparse.Namespace, env: dict, budget: Budget) -> dict:
    """The BIOSSES study preset, stacked, all stacks at once; stamps from bench_sweep's
    Lightning callback give each stack's first training step."""
    need = 60.0 if args.dry else 150.0
    if not budget.fits("preset", need):
        return {"skipped": True}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-preset-", dir=args.work))
    stamps = work / "stamps.jsonl"
    argv = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=study_biosses",
            f"trainer={'cpu' if args.dry else 'gpu'}", f"data_dir={args.data_dir}",
            "checkpoint_every=0", "hydra/sweeper=stacked", "hydra/launcher=parallel",
            f"hydra.sweep.dir={work / 'sweep'}", f"data.cache_dir={work / 'cache'}",
            "+trainer.callbacks=[{_target_: bench_sweep.make_stamp_callback}]"]
    if args.dry:  # one stack of two tiny members, one epoch of a few rows
        argv += ["model=tiny", "hydra.sweeper.size=2", "hydra.launcher.n_jobs=1",
                 "seed=0,1", "stabilizer=none",
                 "data.max_train_examples=8", "data.max_eval_examples=8",
                 "trainer.max_epochs=1", "+trainer.enable_progress_bar=false"]
    else:
        argv += ["hydra.sweeper.size=auto", "hydra.launcher.n_jobs=5"]
    env = {**env, "BENCH_SWEEP_STAMPS": str(stamps)}
    say("$", " ".join(argv[1:]))
    t0 = time.time()
    with open(work / "console.log", "wb") as log:
        try:
            code = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(10.0, budget.left() - 5)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.time() - t0
    events = [json.loads(line) for line in stamps.read_text().splitlines()] \
        if stamps.is_file() else []
    firsts = {}
    for e in events:
        if e["event"] == "step" and e["run"] not in firsts:
            firsts[e["run"]] = e["t"] - e["s"] - t0  # the first step's start
    runs = [json.loads(r.read_text()).get("status")
            for r in (work / "sweep").glob("*/results.json")]
    out = {"exit": code, "wall_s": round(wall, 1), "stacks": len(firsts),
           "to_first_step_s": round(min(firsts.values()), 1) if firsts else None,
           "to_last_stack_first_step_s": round(max(firsts.values()), 1) if firsts else None,
           "completed_runs": runs.count("completed"), "runs": len(runs),
           "console": str(work / "console.log"), "argv": argv[1:]}
    say(f"preset: {out}")
    tail = (work / "console.log").read_text(errors="replace")[-6000:]
    out["console_tail"] = tail
    if code != 0:
        say("preset console tail:", tail[-3000:])
    return out


def cpu_part(shape: dict, shapes: list[tuple[int, int]], members: int,
             steps: int) -> list[dict]:
    """On the CPU: eager against fused attention for a stack of `shape` (MiniLM's), steps of the two
    interleaved (so that what else runs on the machine falls on both), each timed in this
    thread's CPU time; training steps (attention dropout 0.1) and shared evaluation batches
    (half the first row padding)."""
    import torch

    from blurbtune import stacking

    out = []
    for rows, length in shapes:
        batches = _batches(members, rows, length, shape["vocab_size"], steps + 1, "cpu")
        ways = {a: Trainee(shape, members, a, 0.1, "cpu") for a in ("eager", "fused")}
        spent: dict[str, dict[str, list]] = {a: {"train": [], "eval": []} for a in ways}
        for way in ways.values():
            way.step(batches[0])
        shared = _batches(0, rows * 2, length, shape["vocab_size"], 1, "cpu")[0]
        shared.pop("labels")
        shared["attention_mask"][0, length // 2:] = 0
        for i in range(steps):
            for name in (("eager", "fused") if i % 2 == 0 else ("fused", "eager")):
                way = ways[name]
                t0 = time.thread_time()
                way.model.train()
                way.step(batches[1 + i])
                t1 = time.thread_time()
                way.model.eval()
                with torch.no_grad():
                    stacking.forward(way.model, way.stacked, shared, True)
                spent[name]["train"].append(t1 - t0)
                spent[name]["eval"].append(time.thread_time() - t1)
        row = {"members": members, "rows": rows, "length": length, "steps": steps}
        for phase in ("train", "eval"):
            med = {a: statistics.median(spent[a][phase]) for a in ways}
            row[phase] = {"eager_s": round(med["eager"], 4), "fused_s": round(med["fused"], 4),
                          "fused_over_eager": round(med["fused"] / med["eager"], 3)}
        say(f"cpu {rows}x{length} K={members}: {row}")
        out.append(row)
        _release(*ways.values())
    return out


# --------------------------------------------------------------------------- the driver

def setup(args: argparse.Namespace) -> dict:
    """The environment the preset's processes need: on the GPU machine, the carried wheels
    and MiniLM restored (scripts/gpu_study.py's own steps); on a dry run, nothing."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks")]
    if not (args.dry or args.no_setup):
        import gpu_study

        site = Path("/tmp/site")
        gpu_study.install_wheels(ROOT / ".whl", site)
        gpu_study.restore_minilm(ROOT / ".gpu" / "minilm", site)
        paths.insert(0, str(site))
        sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "python": sys.version.split()[0],
           "versions": {n: md.version(n) for n in ("torch", "transformers")}}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "cuda": torch.version.cuda}
    return out


def print_tables(result: dict) -> None:
    if result.get("minilm"):
        print_minilm(result["minilm"])
    if result.get("bert"):
        print_bert(result["bert"])
    print_rest(result)


def print_minilm(rows: list[dict]) -> None:
    print("\n| shape | K | attention | ms/step | train ex/s | peak GiB | x eager | x separate |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for way in ("eager", "fused", "separate"):
            if way in row:
                got = row[way]
                x_eager = row.get("fused_speedup", "") if way == "fused" else ""
                x_sep = row.get("fused_x_separate", "") if way == "fused" else ""
                print(f"| {row['shape']} {row['rows']}x{row['length']} | "
                      f"{1 if way == 'separate' else row['members']} | {got['attention']} | "
                      f"{got['ms_per_step']} | {got['ex_per_s']} | {got.get('peak_gib', '-')} | "
                      f"{x_eager} | {x_sep} |")
        if "loss_after_steps" in row:
            cmp = row["loss_after_steps"]
            print(f"| {row['shape']}: largest member loss difference eager vs fused after "
                  f"{cmp['steps']} steps (dropout off) | {cmp['max_abs_diff']:.2e} |")


def print_bert(rows: list[dict]) -> None:
    print("\n| BERT-base shape | K | ex/s | separate ex/s | x separate | TFLOP/s | "
          "share of matmul |")
    print("|---|---|---|---|---|---|---|")
    for got in rows:
        print(f"| {got['rows']}x{got['length']} | {got['members']} | {got['ex_per_s']} | "
              f"{got['separate_ex_per_s']} | {got['x_separate']} | {got['tflop_per_s']} | "
              f"{100 * got['share_of_matmul']:.1f}% |")


def print_rest(result: dict) -> None:
    if result.get("cpu"):
        print("\n| CPU, MiniLM shape | K | train step eager s | fused s | fused/eager | "
              "eval batch eager s | fused s | fused/eager |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["cpu"]:
            t, e = r["train"], r["eval"]
            print(f"| {r['rows']}x{r['length']} | {r['members']} | {t['eager_s']} | "
                  f"{t['fused_s']} | {t['fused_over_eager']} | {e['eager_s']} | {e['fused_s']} | "
                  f"{e['fused_over_eager']} |")
    preset = result.get("preset", {})
    if preset.get("wall_s") is not None:
        print(f"\nBIOSSES preset: {preset['completed_runs']}/{preset['runs']} runs completed in "
              f"{preset['wall_s']} s; first training step at {preset['to_first_step_s']} s "
              f"(last stack's: {preset['to_last_stack_first_step_s']} s); exit {preset['exit']}")
    for line in result.get("skipped", []):
        print("skipped:", line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on the CPU, every part (the test suite runs it)")
    parser.add_argument("--budget", type=float, default=500,
                        help="seconds for everything, checked before each part (%(default)s)")
    parser.add_argument("--parts", default="matmul,minilm,bert,preset")
    parser.add_argument("--cpu", action="store_true",
                        help="only eager against fused attention on this CPU (1 torch thread, "
                             "MiniLM shape, K=2 at 8x32, 4x128 and 2x512; several minutes)")
    parser.add_argument("--data-dir", default=None,
                        help="BLURB folder for the preset (default: .gpu/blurb; dry: the "
                             "test fixtures)")
    parser.add_argument("--work", default=None,
                        help="folder for the preset's sweep (default: the system's temp)")
    parser.add_argument("--no-setup", action="store_true",
                        help="do not install .whl/ or restore MiniLM (already done)")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or str(ROOT / ("tests/fixtures/blurb" if args.dry
                                                 else ".gpu/blurb"))
    import torch

    if args.cpu:
        torch.set_num_threads(1)
        result = {"environment": environment("cpu"), "threads": 1,
                  "cpu": cpu_part(MINILM, [(8, 32), (4, 128), (2, 512)], 2, 6)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print_tables(result)
        return result
    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device == "cpu" and not args.dry:
        parser.error("no CUDA device: use --dry on a CPU")
    p, budget = (DRY if args.dry else FULL), Budget(args.budget)
    parts = set(args.parts.split(","))
    env = setup(args) if "preset" in parts else {}
    result: dict[str, Any] = {"environment": environment(device), "dry": args.dry,
                              "settings": {k: v for k, v in p.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run cut short keeps what it measured
        result.update(skipped=budget.skipped, errors=ERRORS,
                      elapsed_s=round(time.monotonic() - T0, 1))
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    rate = matmul_rate(device, args.dry)
    result["matmul"] = rate
    save()
    if "minilm" in parts:
        result["minilm"] = minilm_part(p, device, budget)
        save()
    if "bert" in parts:
        result["bert"] = bert_part(p, device, rate["flops"], budget)
        save()
    if args.dry:
        result["cpu"] = cpu_part(TINY, [p["minilm_shapes"]["biosses"]], 2, 2)
    if "preset" in parts:
        result["preset"] = guarded("preset", preset_part, args, env, budget) or {}
    save()
    print_tables(result)
    say(f"done in {result['elapsed_s']} s; JSON in {args.out}")
    return result


if __name__ == "__main__":
    main()

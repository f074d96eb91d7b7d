"""Where a stacked training step's time goes on a GPU: step times with and without dropout, and
`torch.profiler` tables (kernels by device time, operators by host time).

    python benchmarks/profile_stack.py > profile.txt     # on the GPU machine, about 2 minutes

It times, after warm-up, a stack of 10 MiniLM-shaped members (16 x 512 and 16 x 128) with
hidden and attention dropout each on (0.1) or off, a single run, and a BERT-base-shaped stack of
10 at 16 x 512, all with fused attention (`benchmarks/bench_gpu.py`'s `Trainee`: bf16 autocast,
AdamW), and first the cost of one tiny kernel launch and of swapping a generator's state, the
two host costs a stack's per-member attention pays. Without CUDA it runs the same with tiny
shapes on the CPU (a check that it works: tests/test_bench_gpu.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu  # noqa: E402  (puts src/ on the path)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def launch_cost(device: str) -> str:
    import torch

    x = torch.zeros(16, device=device)
    for _ in range(100):
        x.add_(1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    _sync(device)
    launch = (time.perf_counter() - t0) / 2000 * 1e6
    gen = torch.cuda.default_generators[0] if device == "cuda" else torch.default_generator
    t0 = time.perf_counter()
    for _ in range(1000):
        gen.set_state(gen.get_state())
    swap = (time.perf_counter() - t0) / 1000 * 1e6
    return f"a tiny kernel: {launch:.1f} us; a generator's state read and set: {swap:.1f} us"


def step_time(shape: dict, members: int | None, dropout: tuple[float, float], rows: int,
              length: int, device: str, steps: int = 8, profile: bool = False) -> str:
    """ms a step; with `profile`, the profiler's tables of three more steps after it."""
    import torch

    hidden, attention = dropout
    batches = bench_gpu._batches(members or 0, rows, length, shape["vocab_size"], 6 + steps,
                                 device)
    trainee = bench_gpu.Trainee(shape, members, "fused" if members else "sdpa", hidden, device,
                                attention_dropout=attention)
    for batch in batches[:3]:
        trainee.step(batch)
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches[3:3 + steps]:
        trainee.step(batch)
    _sync(device)
    out = f"{(time.perf_counter() - t0) / steps * 1e3:.1f} ms a step"
    if profile:
        from torch.profiler import ProfilerActivity

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda"
                                               else [])
        with torch.profiler.profile(activities=activities) as prof:
            for batch in batches[3 + steps:]:
                trainee.step(batch)
            _sync(device)
        table = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) for e in table) / 3 / 1e3
        by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        out += (f"; device busy {busy:.1f} ms a step\n"
                + table.table(sort_by=by, row_limit=18, max_name_column_width=60) + "\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=12,
                              max_name_column_width=60))
    bench_gpu._release(trainee)
    return out


def main() -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        small, bert, rows, long, short, K = (bench_gpu.MINILM, bench_gpu.BERT_BASE, 16, 512,
                                             128, 10)
    else:
        small, bert, rows, long, short, K = bench_gpu.TINY, bench_gpu.TINY, 2, 16, 8, 2
    print("launch:", launch_cost(device), flush=True)
    runs = [("MiniLM stack, dropout hidden 0.1 attention 0.1", small, K, (0.1, 0.1), long, True),
            ("MiniLM stack, dropout hidden 0.1 attention 0", small, K, (0.1, 0.0), long, False),
            ("MiniLM stack, dropout hidden 0 attention 0.1", small, K, (0.0, 0.1), long, False),
            ("MiniLM stack, no dropout", small, K, (0.0, 0.0), long, False),
            ("MiniLM single run, dropout 0.1", small, None, (0.1, 0.1), long, False),
            ("MiniLM stack short, dropout 0.1", small, K, (0.1, 0.1), short, True),
            ("MiniLM stack short, no dropout", small, K, (0.0, 0.0), short, False),
            ("BERT-base stack, dropout 0.1", bert, K, (0.1, 0.1), long, True),
            ("BERT-base stack, no dropout", bert, K, (0.0, 0.0), long, False),
            ("BERT-base single run short, dropout 0.1", bert, None, (0.1, 0.1), short, True)]
    for name, shape, members, dropout, length, profile in runs:
        print(f"{name} ({rows} x {length}): "
              f"{step_time(shape, members, dropout, rows, length, device, profile=profile)}",
              flush=True)


if __name__ == "__main__":
    main()

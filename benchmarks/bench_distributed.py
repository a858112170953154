"""Step time of a synchronised RegBN on 2 gloo ranks against the unsynchronised layer.

    python benchmarks/bench_distributed.py   # -> benchmarks/results/bench_distributed.json
    python benchmarks/bench_distributed.py --quick

Every process runs one intra-op thread, so the two ranks use the two cores. For each shape the
training step (forward + backward) is timed three ways, in the same run:
- local: the plain layer on one rank's half of the batch (what each rank would do unsynchronised);
- sync:  the synchronised layer on 2 ranks, each holding half of the batch;
- whole: the plain layer on the whole batch in one process (what sync reproduces exactly).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regbn import RegBN, convert_sync_regbn

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [
    ("official README: f 512, g 64x7x7", 50, (512,), (64, 7, 7)),
    ("PMR raw: f 1x28x28, g 3x28x28", 50, (1, 28, 28), (3, 28, 28)),
]


def _layer(fs, gs) -> RegBN:
    return RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]))


def _time_steps(layer, f, g, reps: int) -> float:
    f = f.clone().requires_grad_()
    g = g.clone().requires_grad_()

    def step() -> None:
        f.grad = g.grad = None
        a, b = layer(f, g)
        (a.sum() + b.square().sum()).backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _data(B, fs, gs):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, *fs, generator=gen), torch.randn(B, *gs, generator=gen)


def _worker(rank: int, port: int, reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for name, B, fs, gs in SHAPES:
        f, g = _data(B, fs, gs)
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        t = _time_steps(convert_sync_regbn(_layer(fs, gs)), f[half], g[half], reps)
        worst = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(worst, torch.tensor(t))
        rows.append({"case": name, "sync_2ranks_s": max(float(w) for w in worst)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_distributed.json")
    args = p.parse_args(argv)
    reps = 5 if args.quick else 40
    torch.set_num_threads(1)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = args.out.with_suffix(".ranks.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(port, reps, str(tmp)), nprocs=2, start_method="spawn")
    sync_rows = json.loads(tmp.read_text())
    tmp.unlink()

    cases = []
    for (name, B, fs, gs), srow in zip(SHAPES, sync_rows, strict=True):
        f, g = _data(B, fs, gs)
        local = _time_steps(_layer(fs, gs), f[: B // 2], g[: B // 2], reps)
        whole = _time_steps(_layer(fs, gs), f, g, reps)
        cases.append({"case": name, "B": B, "local_half_batch_s": local,
                      "sync_2ranks_s": srow["sync_2ranks_s"], "whole_batch_1proc_s": whole,
                      "overhead_vs_local": srow["sync_2ranks_s"] / local,
                      "ratio_vs_whole": srow["sync_2ranks_s"] / whole})
    result = {"command": "python benchmarks/bench_distributed.py" + (" --quick" * args.quick),
              "torch": torch.__version__, "backend": "gloo", "threads_per_process": 1,
              "cases": cases}
    args.out.write_text(json.dumps(result, indent=2))
    print("| case | B (global) | local, B/2 (ms) | sync, 2 ranks × B/2 (ms) "
          "| whole B, 1 process (ms) | sync / local | sync / whole |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        print(f"| {c['case']} | {c['B']} | {c['local_half_batch_s'] * 1e3:.2f} "
              f"| {c['sync_2ranks_s'] * 1e3:.2f} | {c['whole_batch_1proc_s'] * 1e3:.2f} "
              f"| {c['overhead_vs_local']:.2f} | {c['ratio_vs_whole']:.2f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time and peak memory of one RegBN training step as B, Df and Dg grow, full W against channel W.

    python benchmarks/bench_scaling.py            # the grid -> results/bench_scaling.json,
                                                  #   docs/scaling.png (under 10 min on 2 cores)
    python benchmarks/bench_scaling.py --quick    # a few tiny cases (used by the tests)

Every case runs in its own subprocess, so that its peak resident memory (``ru_maxrss``) is its
own: the child reports its RSS once torch is imported and the inputs exist (the baseline), and
its peak after the steps; the difference is what the layer and its step cost. The step is
forward + backward of ``RegBN`` in training mode with the default options, on float32 inputs of
shape (B, C, H, W), with torch's default intra-op threads.

- ``projection="full"``: W is Dg×Df (Dg = Cg·H·W, Df = Cf·H·W), up to 4 GiB of float32.
- ``projection="channel"``: W is Cg×Cf, shared over the H·W positions (B·H·W rows).

Each growth is fitted on log-log axes, one sweep per axis with the other sizes fixed: the slope
is the exponent p in time ∝ axisᵖ (memory likewise, above the baseline). The sweep over H·W shows
that the channel W's memory does not grow with the spatial size while the full W's grows as
(H·W)². Timings are medians of a few steps and are indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"

# (axis, B, Cf, Cg, side) sweeps; H = W = side. Each varies one axis, the others fixed.
Case = tuple[str, int, int, int, int]


def grid(quick: bool, big: bool) -> list[Case]:
    """The bounded grid: B ∈ {32 … 4096}; full W up to 256 MiB in the sweeps, then one point at
    1 GiB and one at 4 GiB of W (about 150 s in all on 2 idle cores; ``--skip-big`` leaves those
    two out, and a case that would not fit in the free memory is skipped and recorded)."""
    if quick:
        return [("B", b, 4, 4, 4) for b in (32, 128)]
    cases: list[Case] = [("B", b, 16, 16, 8) for b in (32, 128, 512, 2048, 4096)]
    cases += [("Df", 64, c, 16, 8) for c in (16, 64, 256, 1024)]
    cases += [("Dg", 64, 16, c, 8) for c in (16, 64, 256, 1024)]
    cases += [("HW", 32, 32, 32, s) for s in (4, 8, 16)]
    if big:
        cases += [("W 1 GiB", 64, 4096, 16, 8), ("W 4 GiB", 64, 512, 512, 8)]
    return cases


def w_bytes(projection: str, Cf: int, Cg: int, side: int) -> int:
    hw = side * side if projection == "full" else 1
    return 4 * Cf * hw * Cg * hw


# ----------------------------------------------------------------------------- the child
def child(spec: dict) -> dict:
    """One case, in this process: build, warm up, time ``spec['steps']`` steps, report RSS."""
    import torch

    from regbn import RegBN

    B, Cf, Cg, side = spec["B"], spec["Cf"], spec["Cg"], spec["side"]
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(B, Cf, side, side, generator=gen).requires_grad_()
    g = torch.randn(B, Cg, side, side, generator=gen).requires_grad_()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer = RegBN(Cf, Cg, [side, side], [side, side], projection=spec["projection"],
                  max_projection_bytes=2**33)

    def step() -> None:
        f.grad = g.grad = None
        f_r, g_n = layer(f, g)
        (f_r.sum() + g_n.square().sum()).backward()

    step()  # builds W and any workspace
    times: list[float] = []
    t_end = time.perf_counter() + spec["case_time"]
    while len(times) < spec["steps"] or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": statistics.median(times), "steps_timed": len(times),
            "threads": torch.get_num_threads(),
            "baseline_rss_mb": base_kb / 1024, "peak_rss_mb": peak_kb / 1024,
            "peak_above_baseline_mb": (peak_kb - base_kb) / 1024}


# ----------------------------------------------------------------------------- the parent
def mem_available() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run_case(case: Case, projection: str, args) -> dict:
    axis, B, Cf, Cg, side = case
    hw = side * side
    row = {"axis": axis, "projection": projection, "B": B, "Cf": Cf, "Cg": Cg, "H": side,
           "W": side, "Df": Cf * hw, "Dg": Cg * hw,
           "W_mb": w_bytes(projection, Cf, Cg, side) / 2**20}
    need = 3.5 * w_bytes(projection, Cf, Cg, side) + 4 * B * (Cf + Cg) * hw * 4
    if need > 0.8 * mem_available():
        row["skipped"] = f"needs about {need / 2**30:.1f} GiB; {mem_available() / 2**30:.1f} free"
        return row
    spec = {"B": B, "Cf": Cf, "Cg": Cg, "side": side, "projection": projection,
            "steps": args.steps, "case_time": args.case_time}
    for attempt in range(2):  # once more after a failure (a module half-written by an edit)
        try:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=args.case_timeout)
        except subprocess.TimeoutExpired:
            row["failed"] = [f"timed out after {args.case_timeout:g} s"]
            return row
        if done.returncode == 0 or attempt:
            break
        time.sleep(5)
    if done.returncode != 0:
        row["failed"] = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return row
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def fit_slopes(rows: list[dict]) -> dict:
    """Slope of log(time) and log(memory above baseline) against log(axis) per sweep."""
    import numpy as np

    key = {"B": "B", "Df": "Df", "Dg": "Dg", "HW": "H"}
    out: dict[str, dict] = {}
    for axis, col in key.items():
        for proj in ("full", "channel"):
            pts = [r for r in rows if r["axis"] == axis and r["projection"] == proj
                   and "step_s" in r]
            if len(pts) < 2:
                continue
            x = np.log([r[col] ** (2 if axis == "HW" else 1) for r in pts])
            fit = {"points": len(pts),
                   "time": float(np.polyfit(x, np.log([r["step_s"] for r in pts]), 1)[0])}
            mem = [max(r["peak_above_baseline_mb"], 1e-3) for r in pts]
            fit["memory"] = float(np.polyfit(x, np.log(mem), 1)[0])
            out[f"{proj} vs {'H·W' if axis == 'HW' else axis}"] = fit
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_ = (("B", "B", "B"), ("Df", "Df", "Df (Dg = 1024)"), ("Dg", "Dg", "Dg (Df = 1024)"),
             ("HW", "H", "H·W (C = 32)"))
    fig, ax = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for j, (axis, col, label) in enumerate(axes_):
        for proj, style in (("full", "o-"), ("channel", "s--")):
            pts = [r for r in rows if r["axis"] == axis and r["projection"] == proj
                   and "step_s" in r]
            x = [r[col] ** (2 if axis == "HW" else 1) for r in pts]
            ax[0, j].loglog(x, [r["step_s"] * 1e3 for r in pts], style, label=proj)
            ax[1, j].loglog(x, [max(r["peak_above_baseline_mb"], 0.1) for r in pts], style,
                            label=proj)
        ax[0, j].set_title(f"time per step vs {label}")
        ax[1, j].set_title(f"peak RSS above baseline vs {label}")
        ax[1, j].set_xlabel(label)
        for a in ax[:, j]:
            a.grid(True, which="both", alpha=0.3)
            a.legend()
    ax[0, 0].set_ylabel("ms per training step")
    ax[1, 0].set_ylabel("MB")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| sweep | projection | B | f (C×H×W) | g (C×H×W) | W (MiB) | step (ms) "
             "| peak RSS above baseline (MB) |", "|---|---|---:|---|---|---:|---:|---:|"]
    for r in result["cases"]:
        shape = f"{r['Cf']}×{r['H']}×{r['W']}", f"{r['Cg']}×{r['H']}×{r['W']}"
        if "step_s" in r:
            t, m = f"{r['step_s'] * 1e3:.1f}", f"{r['peak_above_baseline_mb']:.0f}"
        else:
            t, m = r.get("skipped") or f"failed: {r.get('failed')}", "–"
        lines.append(f"| {r['axis']} | {r['projection']} | {r['B']} | {shape[0]} | {shape[1]} "
                     f"| {r['W_mb']:.3g} | {t} | {m} |")
    lines += ["", "| fit (log-log) | points | time slope | memory slope |", "|---|---:|---:|---:|"]
    for name, fit in result["slopes"].items():
        lines.append(f"| {name} | {fit['points']} | {fit['time']:.2f} | {fit['memory']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few tiny cases, for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_scaling.json")
    p.add_argument("--plot", type=Path, default=None,
                   help="log-log figure (default docs/scaling.png; none with --quick)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case, at least")
    p.add_argument("--case-time", type=float, default=1.0, help="seconds of timing per case")
    p.add_argument("--case-timeout", type=float, default=180.0)
    p.add_argument("--skip-big", action="store_true",
                   help="leave out the full W of 1 GiB and 4 GiB (a step over them needs ~8 GiB)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from tqdm import tqdm

    if args.quick:
        args.steps, args.case_time = 1, 0.0
    jobs = [(c, proj) for c in grid(args.quick, not args.skip_big) for proj in ("full", "channel")]
    t0 = time.perf_counter()
    rows = [run_case(c, proj, args)
            for c, proj in tqdm(jobs, desc="bench_scaling", unit="case")]
    result = {
        "torch": __import__("torch").__version__, "cpus": os.cpu_count(),
        "machine": platform.machine(), "wall_s": time.perf_counter() - t0,
        "command": "python benchmarks/bench_scaling.py" + (" --quick" if args.quick else "")
        + (" --skip-big" if args.skip_big else ""),
        "options": "RegBN defaults (normalize_output=True), float32, forward + backward",
        "cases": rows, "slopes": fit_slopes(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot_path = args.plot or (None if args.quick else DOCS / "scaling.png")
    if plot_path is not None:
        plot(rows, plot_path)
    print(markdown(result))
    print(f"\nwrote {args.out}" + (f" and {plot_path}" if plot_path else "")
          + f" in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

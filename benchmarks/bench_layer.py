"""Speed of regbn.RegBN against an L-BFGS baseline and the floor, measured in one process.

    python benchmarks/bench_layer.py                 # full run -> results/bench_layer.json
    python benchmarks/bench_layer.py --quick         # a smoke run (used by the tests)
    python benchmarks/bench_layer.py --device cuda   # on a GPU

Steps timed (median over repeats, same tensors for every contender):
- ours, train: forward + backward of ``regbn.RegBN`` in training mode (λ⁺, f_r, W update).
- lbfgs, train: the published code's recipe written afresh: SVD of g, λ searched with
  ``torch.optim.LBFGS`` from 3 starting points (10, 100, 1000), default L-BFGS settings, on the
  official objective; W, f_r, the running update, the output norms and the same backward.
- floor: K = GGᵀ, eigh(K), W_batch = GᵀA and one ``lerp_`` of W: the work no exact method avoids.
- ours, eval vs. ``f − g @ W`` plus the two output LayerNorms.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as TF
from tqdm import tqdm

from regbn import RegBN
from regbn.solver import solve_batch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int) -> float:
    """Median seconds per call, after warm-up, over at least ``min_time`` seconds."""
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- contenders
def lbfgs_step(f: torch.Tensor, g: torch.Tensor, W_run: torch.Tensor, state: dict) -> None:
    """One training step the way the published code does it (written from its description)."""
    B = f.shape[0]
    F, G = f.reshape(B, -1), g.reshape(B, -1)
    U, s, Vh = torch.linalg.svd(G.detach(), full_matrices=False)

    def objective(lam: torch.Tensor) -> torch.Tensor:
        # The published objective: Σ of all entries of (S/(S²+λ) Uᵀ G)(...)ᵀ, compared with 1.
        usx = (s / (s**2 + lam))[:, None] * (U.T @ G.detach())
        return (usx @ usx.T).sum().sub(1).abs()

    best, best_loss, last_loss = torch.zeros(1), math.inf, math.inf
    for init in (10.0, 100.0, 1000.0):
        if last_loss <= 0.05:  # the published code moves on only while the last start missed
            break
        lam = torch.full((1,), init, requires_grad=True)
        opt = torch.optim.LBFGS([lam])

        def closure(opt=opt, lam=lam) -> torch.Tensor:
            opt.zero_grad()
            loss = objective(lam)
            loss.backward()
            return loss

        opt.step(closure)
        state["starts"] = state.get("starts", 0) + 1
        with torch.no_grad():
            last_loss = float(objective(lam))
        if 0 < float(lam.detach()) < 1e8 and last_loss < best_loss:
            best, best_loss = lam.detach().clone(), last_loss
    lam = best.to(G.dtype)
    W = (Vh.T * (s / (s**2 + lam))) @ (U.T @ F)
    f_r = F - G @ W
    with torch.no_grad():
        d = (W_run - W).abs().mean()
        state["t"] += 1
        state["m"] = 0.9 * state["m"] + 0.1 * d
        state["v"] = 0.99 * state["v"] + 0.01 * d * d
        eta = 0.02 * (state["m"] / (1 - 0.9 ** state["t"])) / (
            (state["v"] / (1 - 0.99 ** state["t"])).sqrt() + 1e-8)
        W_run.lerp_(W.detach(), eta)
    out_f = TF.layer_norm(f_r.reshape(f.shape), list(f.shape[1:]))
    out_g = TF.layer_norm(g, list(g.shape[1:]))
    (out_f.sum() + out_g.square().sum()).backward()


def floor_step(F: torch.Tensor, G: torch.Tensor, W_run: torch.Tensor) -> None:
    K = G @ G.T
    _, A = torch.linalg.eigh(K)
    W_batch = G.T @ (A @ F)
    W_run.lerp_(W_batch, 0.02)


def ours_train_step(layer: RegBN, f: torch.Tensor, g: torch.Tensor) -> None:
    f_r, g_out = layer(f, g)
    (f_r.sum() + g_out.square().sum()).backward()


# ----------------------------------------------------------------------------- cases
def make_inputs(B: int, fs: tuple[int, ...], gs: tuple[int, ...], device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, *fs, generator=gen, dtype=dtype).to(device)
    g = torch.randn(B, *gs, generator=gen, dtype=dtype).to(device)
    return f, g


def run_case(name: str, B: int, fs, gs, device, args, with_lbfgs: bool) -> dict:
    dtype = torch.float32
    f, g = make_inputs(B, fs, gs, device, dtype)
    layer = RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:])).to(device)
    fq, gq = f.clone().requires_grad_(), g.clone().requires_grad_()
    res: dict = {"case": name, "B": B, "f": list(fs), "g": list(gs),
                 "Df": math.prod(fs), "Dg": math.prod(gs)}

    def ours() -> None:
        fq.grad = gq.grad = None
        ours_train_step(layer, fq, gq)

    res["ours_train_s"] = timeit(ours, device, args.min_time, args.max_reps)
    F, G = f.reshape(B, -1), g.reshape(B, -1)
    W_floor = torch.zeros(G.shape[1], F.shape[1], device=device, dtype=dtype)
    res["floor_s"] = timeit(lambda: floor_step(F, G, W_floor), device, args.min_time,
                            args.max_reps)
    if with_lbfgs:
        W_l = torch.zeros_like(W_floor)
        state = {"t": 0, "m": 0.0, "v": 0.0}
        fl, gl = f.clone().requires_grad_(), g.clone().requires_grad_()

        def lb() -> None:
            fl.grad = gl.grad = None
            lbfgs_step(fl, gl, W_l, state)

        res["lbfgs_train_s"] = timeit(lb, device, args.min_time, max(5, args.max_reps // 10))
        res["lbfgs_starts_per_step"] = state["starts"] / state["t"]
        res["speedup_vs_lbfgs"] = res["lbfgs_train_s"] / res["ours_train_s"]
    res["ratio_to_floor"] = res["ours_train_s"] / res["floor_s"]

    layer.eval()
    W = layer.W

    def ours_eval() -> None:
        with torch.no_grad():
            layer(f, g)

    def ref_eval() -> None:
        with torch.no_grad():
            f_r = F - G @ W
            TF.layer_norm(f_r.reshape(f.shape), list(fs))
            TF.layer_norm(g, list(gs))

    res["ours_eval_s"] = timeit(ours_eval, device, args.min_time, args.max_reps)
    res["ref_eval_s"] = timeit(ref_eval, device, args.min_time, args.max_reps)
    res["eval_ratio"] = res["ours_eval_s"] / res["ref_eval_s"]
    return res


def accuracy(device) -> dict:
    """‖W_batch‖²_F − 1 at the seed's shape in float32 and float64."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64 and device.type == "mps":
            continue
        f, g = make_inputs(50, (512,), (64, 7, 7), device, dtype)
        sol = solve_batch(f.reshape(50, -1), g.reshape(50, -1))
        out[str(dtype).replace("torch.", "")] = abs(float(sol.W.double().square().sum()) - 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few tiny cases, for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_layer.json")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: torch's); 1 gives stable figures on a busy box")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    cases: list[tuple[str, int, tuple, tuple, bool]] = [
        ("seed: f 512, g 64x7x7", 50, (512,), (64, 7, 7), True),
        ("PMR raw: f 1x28x28, g 3x28x28", 50, (1, 28, 28), (3, 28, 28), True),
        ("f 128, g 16", 100, (128,), (16,), True),
    ]
    if args.quick:
        args.min_time, args.max_reps = 0.02, 5
        cases = [("quick", 8, (6,), (2, 2, 2), True), ("quick primal", 16, (4,), (3,), False)]
    else:
        cases += [(f"scale B={b}", b, (512,), (64, 7, 7), False)
                  for b in (32, 64, 128, 256, 512, 1024)]
        cases += [(f"scale Dg={c * 49}", 128, (512,), (c, 7, 7), False)
                  for c in (1, 4, 16, 64, 256)]

    rows = [run_case(name, B, fs, gs, device, args, lb)
            for name, B, fs, gs, lb in tqdm(cases, desc="bench_layer", unit="case")]
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "command": "python benchmarks/bench_layer.py" + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else ""),
        "constraint_error": accuracy(device),
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    lines = [
        "| case | B | Df | Dg | ours train (ms) | L-BFGS train (ms) | speed-up | floor (ms) "
        "| ours / floor | ours eval (ms) | f−gW+norms (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        lb = f"{r['lbfgs_train_s'] * 1e3:.1f}" if "lbfgs_train_s" in r else "–"
        sp = f"{r['speedup_vs_lbfgs']:.0f}×" if "speedup_vs_lbfgs" in r else "–"
        lines.append(
            f"| {r['case']} | {r['B']} | {r['Df']} | {r['Dg']} | {r['ours_train_s'] * 1e3:.2f} "
            f"| {lb} | {sp} | {r['floor_s'] * 1e3:.2f} | {r['ratio_to_floor']:.2f} "
            f"| {r['ours_eval_s'] * 1e3:.3f} | {r['ref_eval_s'] * 1e3:.3f} |"
        )
    err = ", ".join(f"{k}: {v:.1e}" for k, v in result["constraint_error"].items())
    lines.append(f"\n|‖W_batch‖²_F − 1| at the seed shape: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

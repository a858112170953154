"""Speed of regbn.RegBN against the published L-BFGS recipe and the floor, in one process.

    python benchmarks/bench_layer.py --threads 1     # the README's run -> results/bench_layer.json
    python benchmarks/bench_layer.py --quick         # a smoke run (used by the tests)
    python benchmarks/bench_layer.py --device cuda   # on a GPU

Steps timed, on the same tensors, interleaved in rounds so that a busy machine slows every
contender alike (medians are reported):
- ours, train: forward + backward of ``regbn.RegBN`` in training mode (λ⁺, f_r, the running
  update, the output norms).
- L-BFGS, train: the published code's training step, written afresh from its description
  (github mogvision/regbn, ``RegBN.py``). SVD of g *inside the autograd graph*; λ searched by
  ``torch.optim.LBFGS`` with default settings from 10, then 100, then 1000 while the last start
  missed the 0.05 tolerance, on the published objective (the sum of every entry of
  usx usxᵀ with usx = inv(diag(s² + λ)) diag(s) Uᵀ G, as explicit matrices); every closure calls
  ``backward(retain_graph=True)``, which reaches through the SVD into g as it does in the
  published code; W_batch = V S Uᵀ F, the out-of-place running update, f_r = f − g W_batch, the
  output norms and the backward of the step. Calibration: on the official README's shapes this
  step costs about 25× one ``torch.linalg.svd(G)``; ``lbfgs_over_svd`` records the ratio here.
- L-BFGS (SVD detached): the same search with the SVD cut out of the graph — a leaner variant.
- minimal: the kernels any exact training step runs, in straight-line torch with λ⁺ given: the
  Gram, its eigendecomposition, f_r = λ(K + λI)⁻¹F with autograd, W_batch = GᵀX, eq. 6's L1 pass
  and update, the output norms and the backward.
- floor: K = GGᵀ, eigh(K), W_batch = GᵀA and one ``lerp_`` of W (no exact step does less; no
  backward).
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
from torch import nn
from tqdm import tqdm

from regbn import RegBN
from regbn.solver import solve_batch

RESULTS = Path(__file__).resolve().parent / "results"
# --options: "default" is RegBN's defaults; "official" is the official example's
# (mogvision/regbn): normalize_input=True, normalize_output=True, affine=True.
OPTIONS = {
    "default": {"normalize_input": False, "normalize_output": True, "affine": False},
    "official": {"normalize_input": True, "normalize_output": True, "affine": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, case_time: float, max_rounds: int
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in interleaved rounds.

    Every contender runs twice before any is timed, so that all see the same process state
    (allocator thresholds, caches, lazily initialised libraries). A round gives each contender
    about the same wall time (at least one call); rounds repeat for about ``case_time`` seconds.
    """
    pilot = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        pilot[name] = time.perf_counter() - t0
    slot = max(pilot.values())
    reps = {k: max(1, int(slot / max(t, 1e-9))) for k, t in pilot.items()}
    per_round = sum(reps[k] * pilot[k] for k in fns)
    rounds = max(3, min(max_rounds, int(case_time / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps[name]):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _nan_to(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=1e-8, posinf=1e-8, neginf=1e-8)


class Norms(nn.Module):
    """The four norms of a layer with the given options, for the references to run alike.

    Input: BatchNorm{k}d for k ≥ 2 spatial dims, else LayerNorm over [C, *spatial] (the official
    layer's choice); output: LayerNorm over [C, *spatial]; Identity where switched off.
    """

    def __init__(self, fs: tuple, gs: tuple, normalize_input: bool, normalize_output: bool,
                 affine: bool) -> None:
        super().__init__()

        def make(shape: tuple, inp: bool) -> nn.Module:
            if not (normalize_input if inp else normalize_output):
                return nn.Identity()
            if inp and len(shape) >= 3:
                return getattr(nn, f"BatchNorm{len(shape) - 1}d")(shape[0], affine=affine)
            return nn.LayerNorm(list(shape), elementwise_affine=affine)

        self.in_f, self.in_g = make(fs, True), make(gs, True)
        self.out_f, self.out_g = make(fs, False), make(gs, False)


def lbfgs_step(
    f: torch.Tensor, g: torch.Tensor, W_run: list[torch.Tensor], state: dict, detach_svd: bool,
    norms: Norms,
) -> None:
    """One training step of the published recipe (see the module docstring)."""
    B = f.shape[0]
    if torch.isnan(f).sum() > 0 or torch.isnan(g).sum() > 0:
        return
    F, G = norms.in_f(f).reshape(B, -1), norms.in_g(g).reshape(B, -1)
    Gs = G.detach() if detach_svd else G
    U, s, Vh = torch.linalg.svd(Gs, full_matrices=False)
    s = torch.where(s > float(s.detach().max()) * 0.0, s, 0.0)  # sigma_THR = sigma_MIN = 0

    def objective(lam: torch.Tensor) -> torch.Tensor:
        usx = torch.linalg.inv(torch.diag(_nan_to(s.square() + lam))) @ (
            torch.diag(s) @ (U.T @ Gs)
        )
        return (usx @ usx.T).sum().sub(1).abs()

    found, losses = [], [100.0]
    for init in (10.0, 100.0, 1000.0):
        if abs(losses[-1]) <= 0.05:  # the published code moves on only while the last start missed
            break
        lam = torch.full((1,), init, device=G.device, requires_grad=True)
        opt = torch.optim.LBFGS([lam])

        def closure(opt=opt, lam=lam) -> torch.Tensor:
            opt.zero_grad()
            loss = objective(lam)
            loss.backward(retain_graph=True)
            return loss

        opt.step(closure)
        state["starts"] = state.get("starts", 0) + 1
        losses.append(objective(lam).item())
        found.append(lam)
    tried = zip(losses[1:], found, strict=True)
    ok = [(loss, lam) for loss, lam in tried if 0 < float(lam.detach()) < 1e8]
    lam = min(ok, key=lambda p: p[0])[1].detach() if ok else G.new_zeros(1)
    scale = _nan_to(torch.linalg.inv(torch.diag(_nan_to(s.square() + lam)))) @ torch.diag(s)
    W_batch = ((U @ scale) @ Vh).T @ F
    with torch.no_grad():
        d = TF.l1_loss(W_run[0], W_batch)
        state["t"] += 1
        state["m"] = 0.9 * state["m"] + 0.1 * d
        state["v"] = 0.99 * state["v"] + 0.01 * d**2
        m_hat = state["m"] / (1 - 0.9 ** state["t"])
        v_hat = state["v"] / (1 - 0.99 ** state["t"])
        eta = 0.02 * m_hat / (torch.sqrt(v_hat) + 1e-8)
        W_run[0] = (1 - eta) * W_run[0] + eta * W_batch
    f_r = (F - G @ W_batch).reshape(f.shape)
    out_f = norms.out_f(f_r)
    out_g = norms.out_g(G.reshape(g.shape))
    (out_f.sum() + out_g.square().sum()).backward()


def minimal_step(
    f: torch.Tensor, g: torch.Tensor, W_run: torch.Tensor, lam: float, norms: Norms
) -> None:
    """The kernels every exact training step runs, λ⁺ given (see the module docstring)."""
    B = f.shape[0]
    F, G = norms.in_f(f).reshape(B, -1), norms.in_g(g).reshape(B, -1)
    K = G @ G.T
    torch.linalg.eigh(K.detach().double())  # the spectrum λ⁺ is read from
    X = torch.linalg.solve(K + lam * torch.eye(B, dtype=K.dtype, device=K.device), F)
    with torch.no_grad():
        D = torch.addmm(W_run, G.T, X, beta=-1)
        d = D.abs().mean()
        W_run.add_(D, alpha=0.02 * float(d / (d + 1e-8)))
    out_f = norms.out_f((lam * X).reshape(f.shape))
    out_g = norms.out_g(G.reshape(g.shape))
    (out_f.sum() + out_g.square().sum()).backward()


def floor_step(F: torch.Tensor, G: torch.Tensor, W_run: torch.Tensor) -> None:
    K = G @ G.T
    _, A = torch.linalg.eigh(K)
    W_batch = G.T @ (A @ F)
    W_run.lerp_(W_batch, 0.02)


def floor_norms_step(f: torch.Tensor, g: torch.Tensor, W_run: torch.Tensor, norms: Norms) -> None:
    """The floor plus the layer's norms forward and backward: the input norms, the floor's
    kernels on their outputs, the output norms of f and g, and the backward through the norms."""
    B = f.shape[0]
    fn, gn = norms.in_f(f), norms.in_g(g)
    floor_step(fn.detach().reshape(B, -1), gn.detach().reshape(B, -1), W_run)
    (norms.out_f(fn).sum() + norms.out_g(gn).square().sum()).backward()


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
    opts = OPTIONS[args.options]
    layer = RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]), **opts).to(device)
    norms = Norms(fs, gs, **opts).to(device)
    res: dict = {"case": name, "B": B, "f": list(fs), "g": list(gs),
                 "Df": math.prod(fs), "Dg": math.prod(gs)}
    F, G = f.reshape(B, -1), g.reshape(B, -1)
    with torch.no_grad():
        lam = solve_batch(norms.in_f(f).reshape(B, -1), norms.in_g(g).reshape(B, -1)).lam

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.clone().requires_grad_()

    def with_grads(step: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
        fl, gl = leaf(f), leaf(g)

        def run() -> None:
            fl.grad = gl.grad = None
            step(fl, gl)

        return run

    W_floor, W_min, W_fn = (torch.zeros(G.shape[1], F.shape[1], device=device) for _ in range(3))
    fns: dict[str, Callable[[], None]] = {
        "ours_train": with_grads(lambda a, b: ours_train_step(layer, a, b)),
        "minimal_train": with_grads(lambda a, b: minimal_step(a, b, W_min, lam, norms)),
        "floor": lambda: floor_step(F, G, W_floor),
        "floor_norms": with_grads(lambda a, b: floor_norms_step(a, b, W_fn, norms)),
    }
    states: dict[str, dict] = {}
    if with_lbfgs:
        for key, detach in (("lbfgs_train", False), ("lbfgs_lean_train", True)):
            state = states[key] = {"t": 0, "m": 0.0, "v": 0.0}
            W_l = [torch.zeros_like(W_floor)]
            fns[key] = with_grads(
                lambda a, b, W_l=W_l, state=state, detach=detach: lbfgs_step(
                    a, b, W_l, state, detach, norms
                )
            )
        fns["svd"] = lambda: torch.linalg.svd(G, full_matrices=False)
    times = time_interleaved(fns, device, args.case_time, args.max_rounds)
    res.update({f"{k}_s": v for k, v in times.items()})
    res["ratio_to_floor"] = res["ours_train_s"] / res["floor_s"]
    res["minimal_ratio_to_floor"] = res["minimal_train_s"] / res["floor_s"]
    res["ratio_to_floor_norms"] = res["ours_train_s"] / res["floor_norms_s"]
    if with_lbfgs:
        res["lbfgs_starts_per_step"] = states["lbfgs_train"]["starts"] / states["lbfgs_train"]["t"]
        res["lbfgs_over_svd"] = res["lbfgs_train_s"] / res["svd_s"]
        res["speedup_vs_lbfgs"] = res["lbfgs_train_s"] / res["ours_train_s"]
        res["speedup_vs_lbfgs_lean"] = res["lbfgs_lean_train_s"] / res["ours_train_s"]
        res["minimal_speedup_vs_lbfgs"] = res["lbfgs_train_s"] / res["minimal_train_s"]
    res.update(time_eval(layer, norms, f, g, device, args))
    return res


def time_eval(layer: RegBN, norms: Norms, f, g, device, args) -> dict:
    """Eval of ours against ``f − g @ W`` plus the same norms, in eval form."""
    B = f.shape[0]
    layer.eval()
    W = layer.W

    def ours_eval() -> None:
        with torch.no_grad():
            layer(f, g)

    norms.eval()

    def ref_eval() -> None:
        with torch.no_grad():
            gn = norms.in_g(g)
            f_r = norms.in_f(f).reshape(B, -1) - gn.reshape(B, -1) @ W
            norms.out_f(f_r.reshape(f.shape))
            norms.out_g(gn)

    times = time_interleaved({"ours_eval": ours_eval, "ref_eval": ref_eval}, device,
                             args.case_time / 2, args.max_rounds)
    res = {f"{k}_s": v for k, v in times.items()}
    res["eval_ratio"] = res["ours_eval_s"] / res["ref_eval_s"]
    return res


def accuracy(device) -> dict:
    """‖W_batch‖²_F − 1 at the official README's shape in float32 and float64."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64 and device.type == "mps":
            continue
        f, g = make_inputs(50, (512,), (64, 7, 7), device, dtype)
        sol = solve_batch(f.reshape(50, -1), g.reshape(50, -1))
        out[str(dtype).replace("torch.", "")] = abs(float(sol.W.double().square().sum()) - 1)
    return out


def cases(args, device: torch.device) -> list[tuple[str, int, tuple, tuple, bool]]:
    """(name, B, f shape, g shape, with the L-BFGS step) for each case; --quick: two tiny ones."""
    if args.quick:
        args.case_time, args.max_rounds = 0.05, 3
        return [("quick", 8, (6,), (2, 2, 2), True), ("quick primal", 16, (4,), (3,), False)]
    out: list[tuple[str, int, tuple, tuple, bool]] = [
        ("official README: f 512, g 64x7x7", 50, (512,), (64, 7, 7), True),
        ("PMR raw: f 1x28x28, g 3x28x28", 50, (1, 28, 28), (3, 28, 28), True),
        ("f 128, g 16", 100, (128,), (16,), True),
    ]
    # B up to 4096 on a GPU; on the CPU up to 1024 (a B=4096 step takes seconds there).
    sizes = (32, 64, 128, 256, 512, 1024) + ((2048, 4096) if device.type == "cuda" else ())
    out += [(f"scale B={b}", b, (512,), (64, 7, 7), False) for b in sizes]
    out += [(f"scale Dg={c * 49}", 128, (512,), (c, 7, 7), False) for c in (1, 4, 16, 64, 256)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few tiny cases, for a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_layer.json")
    p.add_argument("--case-time", type=float, default=8.0,
                   help="seconds of timing per case, shared by its contenders")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: torch's); 1 gives stable figures on a busy box")
    p.add_argument("--options", choices=sorted(OPTIONS), default="default",
                   help="the layer's (and the references') norms: RegBN's defaults, or the "
                   "official example's (normalize_input, normalize_output, affine)")
    p.add_argument("--profile", action="store_true",
                   help="where a training step's time goes, per phase, at the official README's "
                   "shape with the official options, next to the floor with norms "
                   "(-> results/bench_layer_profile.json)")
    p.add_argument("--sync-debug", action="store_true",
                   help="count host synchronisations per training step under "
                   "torch.cuda.set_sync_debug_mode('warn') (CUDA only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile or args.sync_debug:
        import bench_profile  # beside this file; holds the profile and the sync count

        return bench_profile.main(args, device)

    todo = cases(args, device)
    rows = [run_case(name, B, fs, gs, device, args, lb)
            for name, B, fs, gs, lb in tqdm(todo, desc="bench_layer", unit="case")]
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "options": {"name": args.options, **OPTIONS[args.options]},
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "timer": "perf_counter after torch.cuda.synchronize" if device.type == "cuda"
        else "perf_counter",
        "machine": platform.machine(),
        "processor": platform.processor(),
        "command": "python benchmarks/bench_layer.py" + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --options {args.options}" if args.options != "default" else "")
        + (f" --case-time {args.case_time:g}" if args.case_time != 8.0 else ""),
        "constraint_error": accuracy(device),
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    ms = 1e3
    lines = [
        "| case | ours: train step (ms) | L-BFGS as published (ms) | speed-up | L-BFGS / one SVD "
        "| L-BFGS, SVD detached (ms) | speed-up | minimal step (ms) | its speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        if "lbfgs_train_s" not in r:
            continue
        lines.append(
            f"| {r['case']} | {r['ours_train_s'] * ms:.2f} | {r['lbfgs_train_s'] * ms:.1f} "
            f"| {r['speedup_vs_lbfgs']:.1f}× | {r['lbfgs_over_svd']:.0f}× "
            f"| {r['lbfgs_lean_train_s'] * ms:.1f} | {r['speedup_vs_lbfgs_lean']:.1f}× "
            f"| {r['minimal_train_s'] * ms:.2f} | {r['minimal_speedup_vs_lbfgs']:.1f}× |"
        )
    lines += [
        "",
        "| case | B | Df | Dg | ours: train step (ms) | minimal step (ms) | floor (ms) "
        "| ours / floor | minimal / floor | floor with norms (ms) | ours / floor with norms "
        "| ours: eval (ms) | f − gW + norms (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        lines.append(
            f"| {r['case']} | {r['B']} | {r['Df']} | {r['Dg']} | {r['ours_train_s'] * ms:.2f} "
            f"| {r['minimal_train_s'] * ms:.2f} | {r['floor_s'] * ms:.2f} "
            f"| {r['ratio_to_floor']:.2f} | {r['minimal_ratio_to_floor']:.2f} "
            f"| {r['floor_norms_s'] * ms:.2f} | {r['ratio_to_floor_norms']:.2f} "
            f"| {r['ours_eval_s'] * ms:.3f} | {r['ref_eval_s'] * ms:.3f} |"
        )
    err = ", ".join(f"{k}: {v:.1e}" for k, v in result["constraint_error"].items())
    lines.append(f"\n|‖W_batch‖²_F − 1| at the official README's shape: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

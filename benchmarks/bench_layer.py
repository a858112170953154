"""Speed of regbn.RegBN against the official implementation's file itself, in one process.

    python benchmarks/bench_layer.py --options official   # -> results/bench_layer_official.json
    python benchmarks/bench_layer.py --official /path/to/regbn/RegBN.py   # your checkout
    python benchmarks/bench_layer.py --quick              # a smoke run (used by the tests)
    python benchmarks/bench_layer.py --device cuda        # on a GPU

The official file (``RegBN.py`` of github mogvision/regbn) is loaded from ``--official``, else
``$REGBN_OFFICIAL``, else ``../shared/official/RegBN.py`` beside this repository. It is read by
path and run as it is, with only its device plumbing patched at load time (``f"cuda:{gpu}"`` →
the benchmark's device, ``x.get_device()`` → ``x.device``); its algorithm is untouched and no
part of it is copied into this project (it is GPL-3). Without the file the run says so and
reports against the floor alone.

Steps timed, on the same tensors, interleaved in rounds so that a busy machine slows every
contender alike (medians are reported):
- ours, train: forward + backward of ``regbn.RegBN`` in training mode (λ⁺, f_r, the running
  update, the output norms), eager.
- ours, compiled: the same under ``torch.compile(layer, fullgraph=True)`` (one graph, no host
  read; ``--no-compile`` skips it).
- official, train: the official module's forward with ``is_training=True`` and the same backward.
- rewrite (``--rewrite`` only): this benchmark's own rewrite of the official step, kept to compare
  with earlier runs; it is a rewrite, not the official file, and no quoted ratio comes from it.
- minimal: the kernels any exact training step runs, in straight-line torch with λ⁺ given: the
  Gram, its eigendecomposition, f_r = λ(K + λI)⁻¹F with autograd, W_batch = GᵀX, eq. 6's L1 pass
  and update, the output norms and the backward.
- floor: K = GGᵀ, eigh(K), W_batch = GᵀA and one ``lerp_`` of W (no exact step does less; no
  backward); floor with norms adds the layer's norms forward and backward.
- eval: ours (eager and compiled), the official module's eval, and ``f − g @ W`` plus the norms
  written plainly (eager and compiled).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn
from tqdm import tqdm

from regbn import RegBN
from regbn._norms import eval_maths, norm_spec
from regbn.solver import solve_batch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# The official file, for this repository's own runs; users pass --official or $REGBN_OFFICIAL.
DEFAULT_OFFICIAL = ROOT.parent / "shared" / "official" / "RegBN.py"

# The device plumbing of the official file, and what it becomes at load time: its module builds
# W on f"cuda:{gpu}" and moves λ with .to(x.get_device()), which is -1 on the CPU.
_DEVICE_PATCHES = (('f"cuda:{gpu}"', "{device!r}"), (".get_device()", ".device"))


def official_path(arg: str | None) -> Path:
    """--official, else $REGBN_OFFICIAL, else the default beside this repository."""
    return Path(arg or os.environ.get("REGBN_OFFICIAL") or DEFAULT_OFFICIAL)


def load_official(path: Path, device: torch.device):
    """The official module loaded by path, device plumbing patched (see _DEVICE_PATCHES).

    Returns (module, patches): how many times each patch applied. The source is compiled under
    its own path, so tracebacks and profiles name the official file's lines.
    """
    text = path.read_text()
    applied = {}
    for old, new in _DEVICE_PATCHES:
        new = new.format(device=str(device))
        applied[f"{old} -> {new}"] = text.count(old)
        text = text.replace(old, new)
    spec = importlib.util.spec_from_loader("regbn_official_file", loader=None, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[spec.name] = module
    exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - the user's file
    return module, applied
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


def official_train_step(module, f: torch.Tensor, g: torch.Tensor, state: dict) -> None:
    """One training step of the official module as its example calls it, and its backward."""
    state["t"] += 1
    f_r, g_out = module(f, g, is_training=True, n_epoch=state["t"], steps_per_epoch=21)
    (f_r.sum() + g_out.square().sum()).backward()


def run_case(name: str, B: int, fs, gs, device, args, official, with_official: bool) -> dict:
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
    compiled_layer = None
    if args.compile:
        torch._dynamo.reset()  # each case compiles afresh (and stays under the recompile limit)
        compiled_layer = RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]), **opts).to(device)
        step = torch.compile(compiled_layer, fullgraph=True)
        t0 = time.perf_counter()
        with_grads(lambda a, b: ours_train_step(step, a, b))()
        res["compile_train_s"] = time.perf_counter() - t0
        fns["compiled_train"] = with_grads(lambda a, b: ours_train_step(step, a, b))
    off_module = None
    if official is not None and with_official:
        off_module = official.RegBN(f_num_channels=fs[0], g_num_channels=gs[0],
                                    f_layer_dim=list(fs[1:]), g_layer_dim=list(gs[1:]),
                                    **opts).to(device)
        off_state = {"t": 0}
        fns["official_train"] = with_grads(
            lambda a, b: official_train_step(off_module, a, b, off_state))
    states: dict[str, dict] = {}
    if args.rewrite and with_official:
        for key, detach in (("rewrite_train", False), ("rewrite_lean_train", True)):
            state = states[key] = {"t": 0, "m": 0.0, "v": 0.0}
            W_l = [torch.zeros_like(W_floor)]
            fns[key] = with_grads(
                lambda a, b, W_l=W_l, state=state, detach=detach: lbfgs_step(
                    a, b, W_l, state, detach, norms
                )
            )
    times = time_interleaved(fns, device, args.case_time, args.max_rounds)
    res.update({f"{k}_s": v for k, v in times.items()})
    res["ratio_to_floor"] = res["ours_train_s"] / res["floor_s"]
    res["minimal_ratio_to_floor"] = res["minimal_train_s"] / res["floor_s"]
    res["ratio_to_floor_norms"] = res["ours_train_s"] / res["floor_norms_s"]
    if "compiled_train_s" in res:
        res["compiled_over_eager"] = res["compiled_train_s"] / res["ours_train_s"]
        res["compiled_ratio_to_floor_norms"] = res["compiled_train_s"] / res["floor_norms_s"]
    if "official_train_s" in res:
        res["speedup_vs_official"] = res["official_train_s"] / res["ours_train_s"]
        if "compiled_train_s" in res:
            res["compiled_speedup_vs_official"] = res["official_train_s"] / res["compiled_train_s"]
    if "rewrite_train_s" in res:
        res["rewrite_over_official"] = (res["rewrite_train_s"] / res["official_train_s"]
                                        if "official_train_s" in res else None)
    res.update(time_eval(layer, norms, f, g, device, args, off_module, compiled_layer))
    return res


def time_eval(layer: RegBN, norms: Norms, f, g, device, args, off_module=None,
              compiled_layer=None) -> dict:
    """Eval of ours (eager, compiled) against the official module's eval and ``f − g @ W`` plus
    the same norms written plainly (eager, compiled)."""
    B = f.shape[0]
    layer.eval()
    W = layer.W

    def ours_eval() -> None:
        with torch.no_grad():
            layer(f, g)

    norms.eval()

    def plain(f, g):
        gn = norms.in_g(g)
        f_r = norms.in_f(f).reshape(B, -1) - gn.reshape(B, -1) @ W
        return norms.out_f(f_r.reshape(f.shape)), norms.out_g(gn)

    def ref_eval() -> None:
        with torch.no_grad():
            plain(f, g)

    fns = {"ours_eval": ours_eval, "ref_eval": ref_eval}
    if off_module is not None:
        off_module.eval()

        def official_eval() -> None:
            with torch.no_grad():
                off_module(f, g, is_training=False)

        fns["official_eval"] = official_eval
    if compiled_layer is not None:
        compiled_layer.eval()
        c_layer, c_plain = torch.compile(compiled_layer), torch.compile(plain)
        # The layer's own eval maths as a plain function (its overflow-safe LayerNorms
        # included): what the module adds under compile, apart from what the maths costs.
        specs = [norm_spec(m) for m in compiled_layer._norms()]
        fs, gs = compiled_layer.f_shape, compiled_layer.g_shape
        c_same = torch.compile(lambda f, g: eval_maths(f, g, compiled_layer.W, specs, fs, gs,
                                                       f.dtype, compiled_layer.projection))

        def compiled_eval() -> None:
            with torch.no_grad():
                c_layer(f, g)

        def compiled_ref_eval() -> None:
            with torch.no_grad():
                c_plain(f, g)

        def compiled_same_eval() -> None:
            with torch.no_grad():
                c_same(f, g)

        fns.update(compiled_eval=compiled_eval, compiled_ref_eval=compiled_ref_eval,
                   compiled_same_eval=compiled_same_eval)
    times = time_interleaved(fns, device, args.case_time / 2, args.max_rounds)
    res = {f"{k}_s": v for k, v in times.items()}
    res["eval_ratio"] = res["ours_eval_s"] / res["ref_eval_s"]
    if "official_eval_s" in res:
        res["eval_speedup_vs_official"] = res["official_eval_s"] / res["ours_eval_s"]
    if "compiled_eval_s" in res:
        res["compiled_eval_ratio"] = res["compiled_eval_s"] / res["compiled_ref_eval_s"]
        res["compiled_same_eval_ratio"] = res["compiled_eval_s"] / res["compiled_same_eval_s"]
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
    """(name, B, f shape, g shape, with the official file) for each case; --quick: two tiny
    ones. The batch sweep at the official README's shape makes the step-time figure."""
    if args.quick:  # no compile (minutes of inductor), no sweep
        args.case_time, args.max_rounds, args.compile = 0.05, 3, False
        return [("quick", 8, (6,), (2, 2, 2), True), ("quick primal", 16, (4,), (3,), True)]
    out: list[tuple[str, int, tuple, tuple, bool]] = [
        ("official README: f 512, g 64x7x7", 50, (512,), (64, 7, 7), True),
        ("PMR raw: f 1x28x28, g 3x28x28", 50, (1, 28, 28), (3, 28, 28), True),
        ("f 128, g 16", 100, (128,), (16,), True),
    ]
    if args.sweep:
        sizes = (8, 16, 32, 64, 128, 256) + ((512, 1024) if device.type == "cuda" else ())
        out += [(f"batch B={b}", b, (512,), (64, 7, 7), True) for b in sizes]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few tiny cases, for a smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="default: results/bench_layer_official.json with --options official, "
                   "else results/bench_layer.json")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="the official RegBN.py (github mogvision/regbn); default: "
                   "$REGBN_OFFICIAL, else ../shared/official/RegBN.py beside this repository")
    p.add_argument("--case-time", type=float, default=8.0,
                   help="seconds of timing per case, shared by its contenders")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: torch's); 1 gives stable figures on a busy box")
    p.add_argument("--options", choices=sorted(OPTIONS), default="default",
                   help="the layer's (and the references') norms: RegBN's defaults, or the "
                   "official example's (normalize_input, normalize_output, affine)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile contenders")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip the batch-size sweep (the step-time figure's data)")
    p.add_argument("--rewrite", action="store_true",
                   help="also time this benchmark's rewrite of the official step (labelled "
                   "rewrite; never the source of a quoted ratio)")
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

        args.out = args.out or RESULTS / "bench_layer.json"  # bench_profile's own default then
        return bench_profile.main(args, device)
    if args.out is None:
        name = "bench_layer_official.json" if args.options == "official" else "bench_layer.json"
        args.out = RESULTS / name

    path = official_path(args.official)
    official, patches = None, None
    if path.is_file():
        official, patches = load_official(path, device)
        print(f"bench_layer: timing the official file {path} (device plumbing patched: "
              f"{patches})")
    else:
        print(f"bench_layer: the official RegBN.py is not at {path}; pass --official PATH or set "
              "REGBN_OFFICIAL to time it. Reporting against the floor alone.")
    todo = cases(args, device)
    rows = [run_case(name, B, fs, gs, device, args, official, with_off)
            for name, B, fs, gs, with_off in tqdm(todo, desc="bench_layer", unit="case")]
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "options": {"name": args.options, **OPTIONS[args.options]},
        "official_file": str(path) if official is not None else None,
        "official_patches": patches,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "timer": "perf_counter after torch.cuda.synchronize" if device.type == "cuda"
        else "perf_counter",
        "machine": platform.machine(),
        "processor": platform.processor(),
        "command": "python benchmarks/bench_layer.py" + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --options {args.options}" if args.options != "default" else "")
        + (f" --case-time {args.case_time:g}" if args.case_time != 8.0 else "")
        + ("" if args.compile else " --no-compile") + ("" if args.sweep else " --no-sweep")
        + (" --rewrite" if args.rewrite else ""),
        "constraint_error": accuracy(device),
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


def _cell(r: dict, key: str, scale: float = 1e3, fmt: str = ".2f", unit: str = "") -> str:
    v = r.get(key)
    return "–" if v is None else f"{v * scale:{fmt}}{unit}"


def markdown(result: dict) -> str:
    lines = [
        "| case | B | Df | Dg | official file (ms) | ours, eager (ms) | speed-up | ours, compiled "
        "(ms) | speed-up | compiled / eager | floor with norms (ms) | eval: official (ms) "
        "| ours (ms) | speed-up | compiled eval / compiled plain ops | compiled eval / its maths "
        "compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        lines.append(
            f"| {r['case']} | {r['B']} | {r['Df']} | {r['Dg']} | {_cell(r, 'official_train_s')} "
            f"| {_cell(r, 'ours_train_s')} | {_cell(r, 'speedup_vs_official', 1, '.1f', '×')} "
            f"| {_cell(r, 'compiled_train_s')} "
            f"| {_cell(r, 'compiled_speedup_vs_official', 1, '.1f', '×')} "
            f"| {_cell(r, 'compiled_over_eager', 1, '.2f', '×')} | {_cell(r, 'floor_norms_s')} "
            f"| {_cell(r, 'official_eval_s', 1e3, '.3f')} | {_cell(r, 'ours_eval_s', 1e3, '.3f')} "
            f"| {_cell(r, 'eval_speedup_vs_official', 1, '.2f', '×')} "
            f"| {_cell(r, 'compiled_eval_ratio', 1, '.2f', '×')} "
            f"| {_cell(r, 'compiled_same_eval_ratio', 1, '.2f', '×')} |"
        )
    if any("rewrite_train_s" in r for r in result["cases"]):
        lines += ["", "The rewrite of the official step (not the official file; no quoted ratio "
                  "comes from it):", "", "| case | rewrite (ms) | rewrite / official file |",
                  "|---|---:|---:|"]
        for r in result["cases"]:
            if "rewrite_train_s" in r:
                lines.append(f"| {r['case']} | {_cell(r, 'rewrite_train_s', 1e3, '.1f')} "
                             f"| {_cell(r, 'rewrite_over_official', 1, '.2f', '×')} |")
    err = ", ".join(f"{k}: {v:.1e}" for k, v in result["constraint_error"].items())
    lines.append(f"\n|‖W_batch‖²_F − 1| at the official README's shape: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a RegBN training step's time goes, and how many host synchronisations it makes.

Run through ``bench_layer.py``:

    python benchmarks/bench_layer.py --profile        # -> results/bench_layer_profile.json
    python benchmarks/bench_layer.py --device cuda --sync-debug
                                                      # -> results/bench_layer_sync_cuda.json

The profile runs forward + backward of ``RegBN`` at the official README's shape (B = 50; f 512 |
g 64×7×7) with the official example's options (normalize_input, normalize_output, affine) under
``torch.profiler``, and splits the step by the layer's ``record_function("regbn.<phase>")``
labels (input_norms, checks, gram, eigh, secular_root, projections, w_batch, running_update,
output_norms), plus the backward and "other" (what no label covers). A label's time is its own:
labels nested in it are subtracted. A build of regbn without those labels is split by the
profiler's op names instead (the top-level ops of the forward, the backward as one row).

In the same run, outside the profiler, the step, the floor (K = GGᵀ, eigh, W_batch = GᵀA, one
lerp) and the floor with norms (the floor plus the same input and output norms, forward and
backward) are timed, interleaved, with the synchronised timer of ``bench_layer``.

The sync count runs a few training steps under ``torch.cuda.set_sync_debug_mode("warn")`` and
counts the warnings each step raises (one per host synchronisation: ``.item()``, ``nonzero``,
a copy to the CPU, ...), with where they come from.
"""

from __future__ import annotations

import json
import platform
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import bench_layer as bl
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from regbn import RegBN

STEP, BACKWARD = "bench.step", "bench.backward"


def _setup(device: torch.device, options: str, quick: bool):
    B, fs, gs = (8, (6,), (2, 2, 2)) if quick else (50, (512,), (64, 7, 7))
    opts = bl.OPTIONS[options]
    f, g = bl.make_inputs(B, fs, gs, device, torch.float32)
    layer = RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]), **opts).to(device)
    norms = bl.Norms(fs, gs, **opts).to(device)
    fl, gl = f.clone().requires_grad_(), g.clone().requires_grad_()

    def step() -> None:
        fl.grad = gl.grad = None
        with record_function(STEP):
            f_r, g_n = layer(fl, gl)
            loss = f_r.sum() + g_n.square().sum()
            with record_function(BACKWARD):
                loss.backward()

    shape = {"B": B, "f": list(fs), "g": list(gs), "options": {"name": options, **opts}}
    return shape, step, f, g, norms


def _own_times(events) -> tuple[dict[str, float], float]:
    """Microseconds per label (regbn.* and bench.backward), each less the labels nested in it;
    and the total of bench.step."""
    def labelled(e) -> bool:
        return e.name.startswith("regbn.") or e.name == BACKWARD

    def nearest_labels(e) -> list:
        out = []
        for c in e.cpu_children:
            out += [c] if labelled(c) else nearest_labels(c)
        return out

    own: Counter[str] = Counter()
    total = 0.0
    for e in events:
        if e.name == STEP:
            total += e.cpu_time_total
        elif labelled(e):
            own[e.name] += e.cpu_time_total - sum(c.cpu_time_total for c in nearest_labels(e))
    return dict(own), total


def _by_op_names(events) -> dict[str, float]:
    """Without regbn labels: the forward's top-level ops by name, the backward as one row."""
    own: Counter[str] = Counter()
    for e in events:
        if e.name != STEP:
            continue
        for c in e.cpu_children:
            own["backward" if c.name == BACKWARD else c.name] += c.cpu_time_total
    top = dict(own.most_common(12))
    rest = [v for k, v in own.items() if k not in top]
    if rest:
        top[f"other ops ({len(rest)} kinds)"] = sum(rest)
    return top


def profile_step(args, device: torch.device) -> dict:
    options = args.options if args.options != "default" else "official"
    shape, step, f, g, norms = _setup(device, options, args.quick)
    B = shape["B"]
    W_fn = torch.zeros(g[0].numel(), f[0].numel(), device=device)
    W_fl = torch.zeros_like(W_fn)
    fl, gl = f.clone().requires_grad_(), g.clone().requires_grad_()
    F, G = f.reshape(B, -1), g.reshape(B, -1)

    def floor_norms() -> None:
        fl.grad = gl.grad = None
        bl.floor_norms_step(fl, gl, W_fn, norms)

    fns: dict[str, Callable[[], object]] = {"ours_train": step, "floor_norms": floor_norms,
                                            "floor": lambda: bl.floor_step(F, G, W_fl)}
    case_time, rounds = (0.05, 3) if args.quick else (args.case_time, args.max_rounds)
    timed = bl.time_interleaved(fns, device, case_time, rounds)
    n = 3 if args.quick else 50
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
            bl._sync(device)
    events = prof.events()
    own, total = _own_times(events)
    labels = any(k.startswith("regbn.") for k in own)
    phases = own if labels else _by_op_names(events)
    phases = {("backward" if k == BACKWARD else k): v / n / 1e3 for k, v in phases.items()}
    phases["other"] = max(total / n / 1e3 - sum(phases.values()), 0.0)
    return {
        "shape": shape, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "grouped_by": "regbn.<phase> labels" if labels else "profiler op names (no regbn labels)",
        "profiled_steps": n, "profiled_step_ms": total / n / 1e3,
        "phases_ms": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "timed_ms": {k: v * 1e3 for k, v in timed.items()},
        "ratio_to_floor_norms": timed["ours_train"] / timed["floor_norms"],
        "ratio_to_floor": timed["ours_train"] / timed["floor"],
    }


def sync_count(args, device: torch.device) -> dict:
    """Host synchronisations per training step, counted by torch's sync debug mode."""
    if device.type != "cuda":
        return {"device": str(device), "sync_per_step": None,
                "note": "--sync-debug counts CUDA host synchronisations; run it with --device cuda"}
    out: dict = {"device": str(device), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(device), "runs": []}
    for options in ("official", "default"):
        _, step, *_ = _setup(device, options, args.quick)
        for _ in range(2):  # the first step builds W and the workspace
            step()
        counts, where = [], Counter()
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    step()
                syncs = [w for w in caught if "synchroniz" in str(w.message)]
                counts.append(len(syncs))
                where.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out["runs"].append({"options": options, "syncs_per_step": counts,
                            "where": dict(where.most_common(20))})
    out["sync_per_step"] = max(max(r["syncs_per_step"]) for r in out["runs"])
    return out


def markdown(result: dict) -> str:
    step = result["timed_ms"]["ours_train"]
    lines = [f"Grouped by {result['grouped_by']}; {result['profiled_steps']} profiled steps, "
             f"{result['profiled_step_ms']:.2f} ms each under the profiler.", "",
             "| phase | ms per step (profiled) | share |", "|---|---:|---:|"]
    total = sum(result["phases_ms"].values())
    for name, ms in result["phases_ms"].items():
        lines.append(f"| {name} | {ms:.3f} | {100 * ms / total:.0f} % |")
    lines += ["", "| timed in the same run (no profiler) | ms |", "|---|---:|",
              f"| training step | {step:.3f} |",
              f"| floor with norms | {result['timed_ms']['floor_norms']:.3f} |",
              f"| floor | {result['timed_ms']['floor']:.3f} |",
              f"| step / floor with norms | {result['ratio_to_floor_norms']:.2f}× |"]
    return "\n".join(lines)


def main(args, device: torch.device) -> int:
    if args.sync_debug:
        result = sync_count(args, device)
        default = bl.RESULTS / "bench_layer_sync_cuda.json"
        text = json.dumps(result, indent=2) if result["sync_per_step"] is not None \
            else result["note"]
    else:
        result = profile_step(args, device)
        default = bl.RESULTS / ("bench_layer_profile"
                                + ("_cuda" if device.type == "cuda" else "") + ".json")
        text = markdown(result)
    out = args.out if args.out != bl.RESULTS / "bench_layer.json" else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(text)
    print(f"\nwrote {out}")
    return 0

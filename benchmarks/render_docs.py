"""Rewrite the generated tables of docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/render_docs.py           # rewrite every generated block in place
    python benchmarks/render_docs.py --check   # exit 1 when the page is out of date

A block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the prose
outside is kept. Each table names the command that wrote its JSON and the run's torch, threads
and machine; a JSON that is not there renders as "not measured yet".
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
LAYER = "python benchmarks/bench_layer.py"
# The command that writes each JSON, for the JSON files that do not record their own.
COMMANDS = {
    "bench_layer_official.json": f"{LAYER} --options official "
    "--out benchmarks/results/bench_layer_official.json",
    "bench_layer.json": f"{LAYER} --threads 1 --case-time 16",
    "graph_cuda.json": "python benchmarks/gpu_graph_check.py",
    "bench_layer_threads2.json": f"{LAYER} --out benchmarks/results/bench_layer_threads2.json",
    "bench_layer_profile.json": f"{LAYER} --profile",
    "bench_layer_cuda.json": f"{LAYER} --device cuda --options official --case-time 0.6",
    "bench_layer_profile_cuda.json": f"{LAYER} --device cuda --profile",
    "bench_layer_sync_cuda.json": f"{LAYER} --device cuda --sync-debug",
    "bench_scaling.json": "python benchmarks/bench_scaling.py",
    "bench_fx.json": "python benchmarks/bench_fx.py",
    "bench_distributed.json": "python benchmarks/bench_distributed.py",
}


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def header(name: str, res: dict[str, Any]) -> str:
    """The command that wrote ``name`` and the run's torch, threads and machine."""
    env = res.get("env", {})
    torch_v = res.get("torch") or env.get("torch")
    first = (res.get("cases") or [{}])[0]
    threads = (res.get("threads") or res.get("threads_per_process") or env.get("cpus")
               or first.get("threads"))
    parts = [f"torch {torch_v}"] if torch_v else []
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}"
                     + (" per process" if "threads_per_process" in res else ""))
    if res.get("gpu"):
        parts.append(str(res["gpu"]))
    if res.get("machine") or env.get("machine"):
        parts.append(res.get("machine") or env["machine"])
    opts = res.get("options")
    if isinstance(opts, dict):
        parts.append(f"{opts['name']} options")
    cmd = res.get("command") or COMMANDS[name]
    return f"`{cmd}` → `{name}` ({', '.join(parts)})"


def missing(name: str) -> str:
    return f"`{COMMANDS[name]}` → `{name}`: not measured yet."


def from_results(table: Callable[[str, dict[str, Any]], str]) -> Callable[[str], str]:
    """``table`` of one results file, read once; "not measured yet" when the file is absent."""

    def render_file(name: str) -> str:
        res = load(name)
        return missing(name) if res is None else table(name, res)

    return render_file


def ms(seconds: float | None, digits: int = 2) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def ratio(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def layer_table(name: str, res: dict[str, Any]) -> str:
    """The layer's cases: ours (eager, compiled) against the official file, the floor with norms
    and eval."""
    lines = [header(name, res), "",
             "| case | B | Df | Dg | official file (ms) | ours, eager (ms) | speed-up "
             "| ours, compiled (ms) | speed-up | floor with norms (ms) | eval: official file (ms) "
             "| ours (ms) | speed-up | f − gW + norms (ms) | compiled eval / compiled plain ops "
             "| compiled eval / its maths compiled |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["cases"]:
        lines.append(
            f"| {r['case']} | {r['B']} | {r['Df']} | {r['Dg']} "
            f"| {ms(r.get('official_train_s'), 1)} "
            f"| {ms(r['ours_train_s'])} | {ratio(r.get('speedup_vs_official'), 1)} "
            f"| {ms(r.get('compiled_train_s'))} "
            f"| {ratio(r.get('compiled_speedup_vs_official'), 1)} "
            f"| {ms(r.get('floor_norms_s'))} | {ms(r.get('official_eval_s'), 3)} "
            f"| {ms(r['ours_eval_s'], 3)} | {ratio(r.get('eval_speedup_vs_official'))} "
            f"| {ms(r['ref_eval_s'], 3)} | {ratio(r.get('compiled_eval_ratio'))} "
            f"| {ratio(r.get('compiled_same_eval_ratio'))} |")
    if not any("official_train_s" in r for r in res["cases"]):
        lines += ["", "This JSON predates timing the official file itself (–); its L-BFGS "
                  "figures came from a rewrite of the official step and are not shown. Rerun "
                  "the command for them."]
    return "\n".join(lines)


def goal(text: str, value: float | None, ok: bool, note: str = "") -> str:
    if value is None:
        return f"- {text}: – — **not measured**"
    return f"- {text}: {value:.2f}×{note} — **{'met' if ok else 'not met'}**"


def _values(cases: list[dict], key: str) -> list[float]:
    return [c[key] for c in cases if c.get(key) is not None]


def cpu_goals(res: dict[str, Any]) -> str:
    c = res["cases"]
    both = c[:2]
    eager = min(_values(both, "speedup_vs_official"), default=None)
    small = c[2].get("speedup_vs_official") if len(c) > 2 else None
    comp = min(_values(both, "compiled_speedup_vs_official"), default=None)
    slower = max(_values(c, "compiled_over_eager"), default=None)
    ev = min(_values(c, "eval_speedup_vs_official"), default=None)
    cev = max(_values(c, "compiled_eval_ratio"), default=None)
    same = max(_values(c, "compiled_same_eval_ratio"), default=None)
    return "\n".join([
        "Goals (torch's default threads, official options, against the official file):",
        goal("eager ≥ 15× the official step at the two official shapes (the lower)", eager,
             eager is not None and eager >= 15),
        goal("eager ≥ 10× at B=100, f 128, g 16", small, small is not None and small >= 10),
        goal("compiled ≥ 20× at the two official shapes (the lower)", comp,
             comp is not None and comp >= 20),
        goal("compiled step time / eager step time ≤ 1 at every shape (the highest)", slower,
             slower is not None and slower <= 1.0),
        goal("eval ≥ 1.0× the official eval at every shape (the lowest)", ev,
             ev is not None and ev >= 1.0),
        goal("compiled eval ≤ 1.1× the same ops written plainly, compiled: the layer's eval "
             "maths (`regbn._norms.eval_maths`, overflow-safe LayerNorms) as a plain function "
             "(the highest)", same, same is not None and same <= 1.1),
        goal("compiled eval against f − gW with plain `nn.LayerNorm`s, compiled (the highest; "
             "the difference is the overflow-safe LayerNorm's extra max|x| reduction)", cev,
             cev is not None and cev <= 1.1),
    ])


def layer_official() -> str:
    name = "bench_layer_official.json"
    res = load(name)
    if res is None:
        return missing(name) + "\n\nGoals: not measured yet."
    return layer_table(name, res) + "\n\n" + cpu_goals(res)


def batch_sweep() -> str:
    """Step time against batch size at the official README's shape: the figure and its table."""
    name = "bench_layer_official.json"
    res = load(name)
    rows = [r for r in (res or {}).get("cases", []) if r["case"].startswith("batch ")
            or r["case"].startswith("official README")]
    if not rows:
        return missing(name)
    rows.sort(key=lambda r: r["B"])
    lines = [header(name, res or {}), "",
             "![Step time against batch size: the official file, regbn eager, regbn compiled]"
             "(batch_size.png)", "",
             "`python benchmarks/plot_batch.py` draws it from the JSON.", "",
             "| B | official file (ms) | ours, eager (ms) | ours, compiled (ms) | eager speed-up "
             "| compiled speed-up |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['B']} | {ms(r.get('official_train_s'), 1)} | {ms(r['ours_train_s'])} "
                     f"| {ms(r.get('compiled_train_s'))} "
                     f"| {ratio(r.get('speedup_vs_official'), 1)} "
                     f"| {ratio(r.get('compiled_speedup_vs_official'), 1)} |")
    return "\n".join(lines)


def gpu_layer(name: str, res: dict[str, Any]) -> str:
    first = res["cases"][0]
    speed, step = first.get("compiled_speedup_vs_official"), first.get("compiled_train_s")
    return "\n".join([
        layer_table(name, res), "",
        "Goals on the GPU (compiled, B = 50 at the official README's shape):",
        goal("≥ 50× the official file", speed, (speed or 0.0) >= 50),
        "- ≤ 1 ms per step: " + ("– — **not measured**" if step is None else
                                 f"{step * 1e3:.2f} ms — "
                                 f"**{'met' if step <= 1e-3 else 'not met'}**"),
    ])


def profile_table(name: str, res: dict[str, Any]) -> str:
    """Per-phase time of a training step under the profiler, and the step against the floor."""
    total = sum(res["phases_ms"].values())
    timed = res["timed_ms"]
    grouped = res["grouped_by"].replace("regbn.<phase>", "`regbn.<phase>`")
    lines = [header(name, res), "", f"Grouped by {grouped}; {res['profiled_steps']} steps, "
             f"{res['profiled_step_ms']:.2f} ms each under the profiler.", "",
             "| phase | ms per step (profiled) | share |", "|---|---:|---:|"]
    for phase, t in res["phases_ms"].items():
        lines.append(f"| {phase} | {t:.3f} | {100 * t / total:.0f} % |")
    lines += ["", "| timed in the same run (no profiler) | ms |", "|---|---:|"]
    lines += [f"| {label} | {timed[key]:.3f} |" for key, label in (
        ("ours_train", "training step"), ("floor_norms", "floor with norms"), ("floor", "floor"))]
    lines.append(f"| step / floor with norms | {res['ratio_to_floor_norms']:.2f}× |")
    return "\n".join(lines)


def gpu_syncs(name: str, res: dict[str, Any]) -> str:
    lines = [header(name, res), "",
             "| options | host syncs in each of the timed steps | where (file:line: count) |",
             "|---|---|---|"]
    for run in res["runs"]:
        where = ", ".join(f"`{k}`: {v}" for k, v in run["where"].items())
        steps = ", ".join(str(n) for n in run["syncs_per_step"])
        lines.append(f"| {run['options']} | {steps} | {where} |")
    lines += ["", f"At most **{res['sync_per_step']}** host synchronisations per training step."]
    return "\n".join(lines)


def scaling(name: str, res: dict[str, Any]) -> str:
    """Full against channel W, case by case, then the log-log slopes."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in res["cases"]:
        key = (r["axis"], r["B"], r["Cf"], r["Cg"], r["H"], r["W"])
        pairs.setdefault(key, {})[r["projection"]] = r

    def cell(r: dict | None, field: str, scale: float, fmt: str) -> str:
        if r is None or field not in r:
            return "–" if r is None else str(r.get("skipped") or f"failed: {r.get('failed')}")
        return format(r[field] * scale, fmt)

    lines = [header(name, res) + f", {res['cpus']} CPUs, {res['wall_s']:.0f} s in all; "
             f"{res['options']}", "",
             "| sweep | B | f (C×H×W) | g (C×H×W) | full W (MiB) | full: step (ms) "
             "| channel: step (ms) | full: peak RSS (MB) | channel: peak RSS (MB) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for (axis, B, cf, cg, h, w), by in pairs.items():
        full, chan = by.get("full"), by.get("channel")
        w_mb = full.get("W_mb") if full else None
        lines.append(
            f"| {axis} | {B} | {cf}×{h}×{w} | {cg}×{h}×{w} | "
            f"{'–' if w_mb is None else format(w_mb, '.3g')} "
            f"| {cell(full, 'step_s', 1e3, '.1f')} | {cell(chan, 'step_s', 1e3, '.1f')} "
            f"| {cell(full, 'peak_above_baseline_mb', 1, '.0f')} "
            f"| {cell(chan, 'peak_above_baseline_mb', 1, '.0f')} |")
    lines += ["", "| fit (log-log) | points | time slope | memory slope |", "|---|---:|---:|---:|"]
    for fit_name, fit in res["slopes"].items():
        lines.append(f"| {fit_name} | {fit['points']} | {fit['time']:.2f} "
                     f"| {fit['memory']:.2f} |")
    lines += ["", "Figure: [scaling.png](scaling.png)."]
    return "\n".join(lines)


def fx(name: str, res: dict[str, Any]) -> str:
    med, towers = res["median"], res.get("towers")
    lines = [header(name, res), "", res["benchmark"] + f" ({res['model']['parameters']:,} "
             f"parameters), median of {res['repeats']} calls.", "",
             "| step | wall (s) | tracemalloc peak (MB) | maxrss delta (MB) |",
             "|---|---:|---:|---:|"]
    rows = (("symbolic_trace", "`fx.symbolic_trace`"), ("insert", "`insert` (2 pairs)"),
            ("auto", "`insert` (`pairs='auto'`)"),
            ("verified_insert", "`insert` (2 pairs) + structural check on fake tensors"))
    for key, label in rows:
        if key not in med:
            continue
        m = med[key]
        lines.append(f"| {label} | {m['wall_s']:.3f} | {m['tracemalloc_peak_mb']:.1f} "
                     f"| {m['maxrss_delta_mb']:.1f} |")
    if towers is not None:
        lines.append(f"| towers: `insert` (`pairs='auto'`) | {towers['median_wall_s']:.3f} "
                     "| – | – |")
    cold = res["cold_first_call_wall_s"]
    met = "; ".join(f"{k} ≤ {res['goals'][k]:g}: {'met' if v else 'not met'}"
                    for k, v in res["meets_goals"].items())
    lines += ["", f"Cold first `insert`: {cold['insert']:.3f} s; `insert` / `symbolic_trace` = "
              f"{res['insert_over_symbolic_trace']:.2f}×; goals: {met}."]
    if towers is not None:
        ok = "met" if towers["meets_goal"] else "not met"
        lines.append(f"Towers ({towers['parameters']:,} parameters): fusions found: "
                     f"{', '.join(towers['fusions'])}; `pairs='auto'` made "
                     f"{len(towers['auto_pairs'])} pair(s) and skipped {len(towers['skipped'])} "
                     f"fusion(s); wall ≤ {towers['goal_wall_s']:g} s: {ok}.")
    ver = res.get("verification")
    if ver is not None:
        wall = ver["median_wall_s"]
        peak = ver["peak_above_model_mb"]
        lines += ["", f"**The check every `insert` runs**, on real weights: {ver['benchmark']} "
                  f"({ver['parameters']:,} parameters, inputs {ver['input_shapes']}).", "",
                  "| | wall (s) | peak above the model (MB) |", "|---|---:|---:|",
                  f"| one training pass of the model (forward + backward) | "
                  f"{wall['train_pass']:.2f} | {peak['train_step']:.0f} |",
                  f"| one eval pass of the model | {wall['eval_pass']:.2f} | – |",
                  f"| `insert(..., verify=False)` | {wall['insert']:.2f} | "
                  f"{peak['unverified']:.0f} |",
                  f"| `insert(...)` (checks itself) | {wall['verified_insert']:.2f} | "
                  f"{peak['verified']:.0f} |", "",
                  f"The check costs {ver['verification_s']:.2f} s against a budget of "
                  f"{ver['budget_s']:.2f} s (two sides × one training and one eval pass): "
                  f"{ver['verification_over_budget']:.2f}× the budget; its peak is "
                  f"{ver['verified_peak_over_train_step']:.2f}× a training step's. Goals: "
                  + "; ".join(f"{k} ≤ {ver['goals'][k]:g}: {'met' if v else 'not met'}"
                              for k, v in ver["meets_goals"].items()) + "."]
    return "\n".join(lines)


def distributed(name: str, res: dict[str, Any]) -> str:
    lines = [header(name, res) + f", backend {res['backend']}", "",
             "| case | B (global) | local, B/2 (ms) | sync, 2 ranks × B/2 (ms) "
             "| whole B, 1 process (ms) | sync / local | sync / whole |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in res["cases"]:
        lines.append(f"| {c['case']} | {c['B']} | {ms(c['local_half_batch_s'])} "
                     f"| {ms(c['sync_2ranks_s'])} | {ms(c['whole_batch_1proc_s'])} "
                     f"| {c['overhead_vs_local']:.2f} | {c['ratio_vs_whole']:.2f} |")
    return "\n".join(lines)


def speedups(name: str, key: str = "speedup_vs_official") -> str | None:
    res = load(name)
    vals = _values((res or {}).get("cases", [])[:3], key)
    # Rounded down, both ends: a quoted range never overstates a measured ratio.
    return f"{math.floor(min(vals))}–{math.floor(max(vals))}×" if vals else None


def readme() -> str:
    cpu = speedups("bench_layer_official.json") or "not measured yet"
    comp = speedups("bench_layer_official.json", "compiled_speedup_vs_official")
    gpu = speedups("bench_layer_cuda.json")
    comp_text = f", {comp} compiled (`torch.compile(layer, fullgraph=True)`)" if comp else ""
    gpu_text = (f"{gpu} on one GPU" if gpu else
                "on a GPU not yet measured against the official file")
    return ("Speed-up of a `RegBN` training step over the official implementation's `RegBN.py` "
            "itself (same tensors, one process, the official example's options, its three "
            f"shapes):\n{cpu} eager{comp_text} on the CPU at torch's default threads; "
            f"{gpu_text}.\n"
            "`python benchmarks/bench_layer.py --options official` reproduces it (the official "
            "file from `--official PATH` or `$REGBN_OFFICIAL`).\nEvery table, the per-phase "
            "profile and full against channel W: [docs/benchmarks.md](docs/benchmarks.md), "
            "[scaling.png](docs/scaling.png), [batch_size.png](docs/batch_size.png).")


RENDERERS: dict[str, Callable[[], str]] = {
    "readme": readme,
    "layer-official": layer_official,
    "layer-batch": batch_sweep,
    "layer-one-thread": lambda: from_results(layer_table)("bench_layer.json"),
    "layer-threads2": lambda: from_results(layer_table)("bench_layer_threads2.json"),
    "profile-cpu": lambda: from_results(profile_table)("bench_layer_profile.json"),
    "gpu-layer": lambda: from_results(gpu_layer)("bench_layer_cuda.json"),
    "gpu-profile": lambda: from_results(profile_table)("bench_layer_profile_cuda.json"),
    "gpu-syncs": lambda: from_results(gpu_syncs)("bench_layer_sync_cuda.json"),
    "scaling": lambda: from_results(scaling)("bench_scaling.json"),
    "fx": lambda: from_results(fx)("bench_fx.json"),
    "distributed": lambda: from_results(distributed)("bench_distributed.json"),
}


def render(text: str) -> str:
    """``text`` with every generated block rewritten; every renderer must have its block."""
    found = [m.group(2) for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(RENDERERS))
    absent = sorted(set(RENDERERS) - set(found))
    if unknown or absent:
        raise SystemExit(f"render_docs: the page has unknown blocks {unknown} and lacks {absent}")
    return BLOCK.sub(lambda m: m.group(1) + RENDERERS[m.group(2)]() + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when the page is out of date")
    p.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    old = args.doc.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"{args.doc} is out of date: run python benchmarks/render_docs.py",
                  file=sys.stderr)
        return int(new != old)
    if new != old:
        args.doc.write_text(new)
    print(f"{'rewrote' if new != old else 'unchanged:'} {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

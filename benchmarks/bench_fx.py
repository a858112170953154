"""Time ``regbn.insert`` on large multimodal models built on the meta device.

1. Two ResNet-50-sized convolutional trunks (RGB and depth, 23.5 M parameters each) fuse by
   concat of their pooled features. The same run times plain ``torch.fx.symbolic_trace``.
2. Two transformer towers, HF ``BertModel`` (BERT-base) and ``ViTModel`` (ViT-B/16), kept whole as
   leaves (transformers 5 has no fx tracer), fuse twice: a concat of their pooled features and a
   token-level cross-attention (image tokens attend to text tokens, the attention mask reused).
   ``pairs="auto"`` must pair the pooled features and skip the token-level fusion, whose W
   (151296 x 98304 floats) would pass ``max_projection_bytes``, with a message. Needs
   transformers; skipped without it.

Shapes come from ``input_shapes`` (+ ``input_dtypes`` for token ids), on fake tensors, so no
weights or activations are ever allocated. These timings are of ``insert(..., verify=False)``
(tracing, shapes, splicing); ``verified_insert`` adds the structural verification that
``input_shapes`` allows (fake forward and backward passes).

3. The verification on real weights: the same two ResNet-50 trunks on the CPU, batch 8 at
   224x224. ``regbn.insert`` with ``example_inputs`` checks the traced graph against the model
   (each side: one forward and backward pass in training, one forward pass in eval). Its cost
   is compared with that budget (tracing plus two such passes per side, timed on the model
   itself), and its peak memory (each in a fresh process, max RSS above the built model) with
   one training step of the model (forward and backward). ``--skip-verification`` leaves it
   out.

    python benchmarks/bench_fx.py [--batch 32] [--repeats 5] [--verify-repeats 3]
                                  [--skip-verification]

Writes benchmarks/results/bench_fx.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from regbn.fx import insert

GOALS = {"wall_s": 5.0, "peak_mb_above_model": 200.0, "ratio_to_symbolic_trace": 4.0}
TOWERS_GOAL_S = 5.0


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Trunk(nn.Module):
    """ResNet-50 without its classifier: (B, c_in, H, W) -> (B, 2048)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, c = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(c, width, stride if i == 0 else 1))
                c = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class TwoStream(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.rgb = ResNet50Trunk(3)
        self.depth = ResNet50Trunk(1)
        self.fc = nn.Linear(4096, classes)

    def forward(self, rgb, depth):
        return self.fc(torch.cat([self.rgb(rgb), self.depth(depth)], 1))


class Towers(nn.Module):
    """A text tower and an image tower kept whole, fused by the wrapping model (twice)."""

    def __init__(self, text: nn.Module, image: nn.Module, dim: int = 768) -> None:
        super().__init__()
        self.text, self.image = text, image
        self.xattn = nn.MultiheadAttention(dim, 12, batch_first=True)
        self.head = nn.Linear(2 * dim, 10)
        self.out = nn.Linear(dim, 10)

    def forward(self, input_ids, attention_mask, pixel_values):
        t = self.text(input_ids=input_ids, attention_mask=attention_mask)
        v = self.image(pixel_values=pixel_values)
        pooled = self.head(torch.cat([t.pooler_output, v.pooler_output], 1))
        tokens = t.last_hidden_state
        mask = attention_mask == 0
        x, _ = self.xattn(v.last_hidden_state, tokens, tokens, key_padding_mask=mask)
        return pooled + self.out(x.mean(1))


def bench_towers(batch: int, repeats: int) -> dict[str, Any] | None:
    """``pairs="auto"`` on BERT-base + ViT-B/16 towers as leaves, on the meta device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers  # optional: only this case needs it
    except ImportError:
        return None
    with torch.device("meta"):
        model = Towers(
            transformers.BertModel(transformers.BertConfig()),
            transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=True),
        )
    shapes = [(batch, 128), (batch, 128), (batch, 3, 224, 224)]
    dtypes = [torch.int64, torch.int64, None]
    leaves = [transformers.BertModel, transformers.ViTModel]
    caught: list[str] = []

    def do_auto() -> fx.GraphModule:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = insert(
                model, "auto", input_shapes=shapes, input_dtypes=dtypes, leaf_modules=leaves
            )
        caught[:] = [str(w.message) for w in seen if "skipped" in str(w.message)]
        return out

    cold = _untimed_wall(do_auto)
    walls = [_untimed_wall(do_auto) for _ in range(repeats)]
    patched = do_auto()
    layers = [n for n in patched.graph.nodes if n.op == "call_module" and n.target == "regbn_0"]
    pairs = [(n.args[0].name, n.args[1].name) for n in layers]
    shapes_in = [patched.get_submodule(n.target).f_shape for n in layers]
    median = statistics.median(walls)
    return {
        "benchmark": "regbn.insert(pairs='auto') on BERT-base + ViT-B/16 towers (HF "
        "transformers, leaves) built on torch.device('meta')",
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shapes": shapes,
        "input_dtypes": [str(d) if d is not None else None for d in dtypes],
        "fusions": ["cat of the pooled features", "token-level cross-attention (xattn)"],
        "auto_pairs": pairs,
        "pooled_f_shape": shapes_in,
        "skipped": caught,
        "cold_first_call_wall_s": cold,
        "median_wall_s": median,
        "goal_wall_s": TOWERS_GOAL_S,
        "meets_goal": median <= TOWERS_GOAL_S
        and len(pairs) == 1
        and len(caught) == 1
        and "xattn" in caught[0],
    }


VERIFY_BATCH = 8


def _real_case(batch: int = VERIFY_BATCH) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = TwoStream().train()
    inputs = (torch.randn(batch, 3, 224, 224), torch.randn(batch, 1, 224, 224))
    return model, inputs


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(what: str) -> None:
    """In a fresh process: peak RSS above the built model of one training step or one insert.

    Linux: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so
    the allocations of building the model do not count."""
    model, inputs = _real_case()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    if what == "train_step":
        model(*inputs).sum().backward()
    else:
        insert(model, [("module:rgb", "module:depth")], inputs, verify=what == "verified")
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_above_model_mb": (peak - base) / 1024}))


def _peak(what: str) -> float:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", what],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_above_model_mb"])


def bench_verification(repeats: int) -> dict[str, Any]:
    """The verification's time and peak memory against its budget (module docstring, 3)."""
    model, inputs = _real_case()
    pairs = [("module:rgb", "module:depth")]

    def train_pass() -> None:
        model.train()
        model(*inputs).sum().backward()
        model.zero_grad(set_to_none=True)

    def eval_pass() -> None:
        model.eval()
        with torch.no_grad():
            model(*inputs)
        model.train()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    walls: dict[str, list[float]] = {"train_pass": [], "eval_pass": [], "insert": [],
                                     "verified_insert": []}  # fmt: skip
    train_pass()  # warm-up
    for _ in range(repeats):
        walls["train_pass"].append(_untimed_wall(train_pass))
        walls["eval_pass"].append(_untimed_wall(eval_pass))
        walls["insert"].append(_untimed_wall(lambda: insert(model, pairs, inputs, verify=False)))
        walls["verified_insert"].append(_untimed_wall(lambda: insert(model, pairs, inputs)))
    model.load_state_dict(state)  # the passes above updated BatchNorm statistics
    med = {k: statistics.median(v) for k, v in walls.items()}
    cost = med["verified_insert"] - med["insert"]
    budget = 2 * (med["train_pass"] + med["eval_pass"])
    peaks = {what: _peak(what) for what in ("train_step", "verified", "unverified")}
    return {
        "benchmark": "regbn.insert with example_inputs (verification on) on two ResNet-50 "
        "trunks with real weights on the CPU",
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shapes": [list(t.shape) for t in inputs],
        "repeats": repeats,
        "median_wall_s": med,
        "verification_s": cost,
        "budget_s": budget,
        "verification_over_budget": cost / budget,
        "peak_above_model_mb": peaks,
        "verified_peak_over_train_step": peaks["verified"] / peaks["train_step"],
        "goals": {"verification_over_budget": 1.0, "verified_peak_over_train_step": 1.05},
        "meets_goals": {
            "verification_over_budget": cost / budget <= 1.0,
            "verified_peak_over_train_step": peaks["verified"] <= 1.05 * peaks["train_step"],
        },
        "budget_note": "budget = two sides x (one forward and backward pass in training + one "
        "forward pass in eval), timed on the model itself in the same process",
        "memory_note": "peak RSS above the built model, each in a fresh process (Linux: the "
        "peak is reset after the build); the same measurement of one training step varies by "
        "about 3 % between runs, hence the 5 % margin",
    }


def _measure(fn: Callable[[], Any]) -> dict[str, float]:
    """Wall time of one call, then memory of another (tracemalloc slows Python code ~3x)."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {
        "wall_s": wall,
        "tracemalloc_peak_mb": peak / 2**20,
        "maxrss_delta_mb": (rss1 - rss0) * scale / 2**20,
    }


def _untimed_wall(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_fx.json"
    )
    parser.add_argument("--skip-verification", action="store_true")
    parser.add_argument("--verify-repeats", type=int, default=3)
    parser.add_argument("--peak-child", choices=["train_step", "verified", "unverified"])
    args = parser.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child)
        return {}

    with torch.device("meta"):
        model = TwoStream()
    n_params = sum(p.numel() for p in model.parameters())
    shapes = [(args.batch, 3, 224, 224), (args.batch, 1, 224, 224)]
    pairs = [("module:rgb", "module:depth"), ("rgb.layer4", "depth.layer4")]

    def do_trace() -> fx.GraphModule:
        return fx.symbolic_trace(model)

    def do_insert() -> nn.Module:
        return insert(
            model, pairs, input_shapes=shapes, max_projection_bytes=2**40, verify=False
        )

    def do_verified() -> nn.Module:
        return insert(model, pairs, input_shapes=shapes, max_projection_bytes=2**40)

    def do_auto() -> nn.Module:
        return insert(model, "auto", input_shapes=shapes, verify=False)

    cold = {
        "symbolic_trace": _untimed_wall(do_trace),
        "insert": _untimed_wall(do_insert),  # first FakeTensorMode use: imports, caches
    }
    runs: dict[str, list[dict[str, float]]] = {
        "symbolic_trace": [], "insert": [], "auto": [], "verified_insert": []
    }  # fmt: skip
    for _ in range(args.repeats):
        runs["symbolic_trace"].append(_measure(do_trace))
        runs["insert"].append(_measure(do_insert))
        runs["auto"].append(_measure(do_auto))
        runs["verified_insert"].append(_measure(do_verified))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    patched = do_insert()
    nodes = len(patched.graph.nodes)
    summary = {name: {key: median(name, key) for key in runs[name][0]} for name in runs}
    ratio = summary["insert"]["wall_s"] / summary["symbolic_trace"]["wall_s"]
    checks = {
        "wall_s": summary["insert"]["wall_s"] <= GOALS["wall_s"],
        "peak_mb_above_model": summary["insert"]["tracemalloc_peak_mb"]
        <= GOALS["peak_mb_above_model"],
        "ratio_to_symbolic_trace": ratio <= GOALS["ratio_to_symbolic_trace"],
    }
    towers = bench_towers(args.batch, args.repeats)
    verification = None if args.skip_verification else bench_verification(args.verify_repeats)
    result = {
        "benchmark": "regbn.insert on two ResNet-50 trunks built on torch.device('meta')",
        "model": {
            "parameters": n_params,
            "graph_nodes_after_insert": nodes,
            "input_shapes": shapes,
            "pairs": pairs,
            "layers": {
                name: {"f_shape": m.f_shape, "g_shape": m.g_shape}
                for name, m in patched.named_children()
                if name.startswith("regbn_")
            },
        },
        "repeats": args.repeats,
        "cold_first_call_wall_s": cold,
        "median": summary,
        "insert_over_symbolic_trace": ratio,
        "goals": GOALS,
        "meets_goals": checks,
        "memory_note": "tracemalloc peak counts Python-level allocations during the call; the "
        "meta model holds no storage, so this is all memory above the model",
        "towers": towers,
        "verification": verification,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    med = result["median"]
    print(f"{'step':<22}{'wall (s)':>10}{'tracemalloc peak (MB)':>24}{'maxrss delta (MB)':>20}")
    for name, label in (
        ("symbolic_trace", "fx.symbolic_trace"),
        ("insert", "insert (2 pairs)"),
        ("auto", "insert (auto)"),
        ("verified_insert", "insert + fake verify"),
    ):
        m = med[name]
        print(
            f"{label:<22}{m['wall_s']:>10.3f}{m['tracemalloc_peak_mb']:>24.1f}"
            f"{m['maxrss_delta_mb']:>20.1f}"
        )
    towers = result["towers"]
    if towers is not None:
        print(
            f"{'towers: insert (auto)':<22}{towers['median_wall_s']:>10.3f}   pairs "
            f"{towers['auto_pairs']}; skipped {len(towers['skipped'])} (goal met: "
            f"{towers['meets_goal']})"
        )
    ver = result["verification"]
    if ver is not None:
        print(
            f"verification on real weights: {ver['verification_s']:.2f} s against a budget of "
            f"{ver['budget_s']:.2f} s ({ver['verification_over_budget']:.2f}x); peak "
            f"{ver['peak_above_model_mb']['verified']:.0f} MB against a training step's "
            f"{ver['peak_above_model_mb']['train_step']:.0f} MB; goals met: {ver['meets_goals']}"
        )
    cold = result["cold_first_call_wall_s"]
    print(
        f"cold first insert: {cold['insert']:.3f} s; insert / symbolic_trace = "
        f"{result['insert_over_symbolic_trace']:.2f}x; goals met: {result['meets_goals']}"
    )


if __name__ == "__main__":
    main()

"""Draw docs/batch_size.png: training-step time against batch size, from bench_layer's JSON.

    python benchmarks/plot_batch.py                 # results/bench_layer_official.json
    python benchmarks/plot_batch.py --json other.json --out docs/batch_size.png

The cases are the batch sweep at the official README's shape (f 512 | g 64×7×7) that
``bench_layer.py --options official`` writes: the official file, regbn eager and regbn compiled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path,
                   default=ROOT / "benchmarks" / "results" / "bench_layer_official.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "batch_size.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(args.json.read_text())
    rows = sorted((r for r in res["cases"] if r["f"] == [512] and r["g"] == [64, 7, 7]),
                  key=lambda r: r["B"])
    if not rows:
        raise SystemExit(f"plot_batch: {args.json} has no case at f 512 | g 64x7x7")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, style in (("official_train_s", "official RegBN.py", "o-"),
                              ("ours_train_s", "regbn, eager", "s-"),
                              ("compiled_train_s", "regbn, torch.compile", "^-")):
        pts = [(r["B"], r[key] * 1e3) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("training step, forward + backward (ms)")
    threads = res.get("threads")
    ax.set_title(f"f 512 | g 64×7×7, official example's options; {res.get('device', 'cpu')}, "
                 f"{threads} threads, torch {res.get('torch')}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

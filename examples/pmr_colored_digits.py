"""The official RegBN PMR example, offline: gray + colored digits, with and without RegBN.

The official example (mogvision/regbn, ``example_PMR``; RegBN, NeurIPS 2023) trains a
two-branch classifier (a CNN on the gray digit, a CNN on the colored digit, features
concatenated, one linear head) with and without RegBN. The colour follows the label in
training and is random at test time, so it is a confounder. As in the official example, each
modality's test accuracy is read from its half of the head's weight.

RegBN enters only through ``regbn.insert``; the model class below is the official example's,
minus the RegBN call it hard-wires into its forward:

* ``--placement input`` (default, the official placement): the raw inputs, pair
  ``("gray", "colored")``.
* ``--placement late``: the branch features before the concat,
  pair ``("gray_net.fc", "colored_net.fc")``.
* ``--placement conv4``: the branches' last feature maps (conv4 after its ReLU, 64×7×7 each),
  pair ``("node:gray_net_relu_3", "node:colored_net_relu_3")`` (the branch's ReLU module is
  called four times; its fourth call is conv4's).
* ``--placement both``: the input and late RegBN arms side by side, with the baseline;
  ``--placement none``: the baseline alone.
* ``--lambda-rule paper|official|both``: ||W||_F = 1 (the paper), the published code's
  condition, or one arm of each per placement.
* ``--projection full|channel|both``: the paper's full W (Dg×Df, default), one Cg×Cf W shared
  over spatial positions (arm ``regbn-<placement>-channel``), or one arm of each. With ``both``
  (or ``--cost``) every arm runs in a process of its own, which times each training step and
  measures the peak resident memory of its training; the JSON's ``cost`` holds them.

Which modality is f? ``RegBN(f, g)`` removes from f the part that g explains linearly and
passes g on (layer-normalised only). The official example calls ``RegBN_(gray, colored)``, so
f = gray and g = colored, and we keep that choice (``--f-modality colored`` swaps them).

Data: scikit-learn's digits grown to 10,000 training and 2,000 test digits by random affine,
elastic and stroke-width transforms, painted with ten pastel class colours plus jitter (see
``colored_digits.py``), or a local MNIST with ``--mnist DIR``. The colours lie close enough
together that the jitter blurs neighbours (the colour alone names the label for about two
thirds of the training digits), so the gray branch learns the digits in the baseline, as on
colored MNIST, while the colour stays the training shortcut.

Every run is deterministic: deterministic algorithms, seeded generators for
the data, the initialisation and the batch order, and a fixed thread count (``--threads``,
default 2), so the same command on the same machine prints the same numbers.

Outputs in ``--out`` (default ``out/pmr``): ``pmr_colored_digits.png`` (test accuracy and
training loss per modality against epoch, mean ± std over seeds) and
``pmr_colored_digits.json`` (the configuration, versions and every curve of every seed); the
tables are printed as Markdown.

    python examples/pmr_colored_digits.py            # baseline + RegBN on the inputs, 3 seeds
    python examples/pmr_colored_digits.py --placement both --lambda-rule both   # four arms
    python examples/pmr_colored_digits.py --quick    # smoke test, < 1 minute
    python examples/pmr_colored_digits.py --placement conv4 --projection both --epochs 2
    python examples/pmr_colored_digits.py --full --device cuda   # 60,000 digits, 75 epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from colored_digits import (
    DEFAULT_JITTER_VAR,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    DEFAULT_PALETTE,
    PALETTES,
    Augmentation,
    build_colored_digits,
)
from tqdm import tqdm

import regbn

# The official example's RegBN settings (example_PMR/regbn/RegBN_kwargs.py), minus the shapes,
# which regbn.insert infers.
OFFICIAL_REGBN_KWARGS = dict(
    normalize_input=True,
    normalize_output=True,
    affine=True,
    sigma_THR=0.0,
    sigma_MIN=1e-8,
)
SEED_REGBN_KWARGS = OFFICIAL_REGBN_KWARGS  # older name, imported by the notebook

# The official example's reported values (MNIST, 75 epochs): final test accuracy per modality.
OFFICIAL_REPORTED = {
    "baseline": {"gray": 0.93, "colored": 0.15},
    "regbn-input": {"gray": 0.93, "colored": 0.26},
}

# Where RegBN goes: (f, g) pairs in regbn.insert's naming, with f = the gray modality.
PLACEMENTS: dict[str, tuple[str, str]] = {
    "input": ("gray", "colored"),
    "late": ("gray_net.fc", "colored_net.fc"),
    "conv4": ("node:gray_net_relu_3", "node:colored_net_relu_3"),
}
PROJECTIONS = ("full", "channel")
NORMS_ONLY = "norms-only"
# Where the branches fuse (the concat before the head), named as a user names the tensors: the
# dependence between them is measured there after training, on the test digits, in every arm.
FUSION_PAIR = ("gray_net.fc", "colored_net.fc")
MODALITIES = ("fused", "gray", "colored")


# --------------------------------------------------------------------------------------------
# The official example's model (example_PMR/basic_model.py), without its RegBN call
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

    Returns the gray features, the colored features and the logits, as the official one does;
    the per-modality accuracies come from the features and the head's weight halves.
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


class NormsOnlyClassifier(CGClassifier):
    """The classifier with RegBN's input and output normalisation on the raw inputs but without
    its projection: each modality through ``BatchNorm2d`` then ``LayerNorm`` over (C, H, W),
    torch's own modules, as ``RegBN(normalize_input=True, normalize_output=True, affine=True)``
    builds them (the norms-only arm).

    Built by hand here rather than by an option of the layer: RegBN without its projection is
    not RegBN, and torch's modules make plain that nothing of the λ solve runs in this arm.
    """

    def __init__(self, image_size: int = 28) -> None:
        super().__init__()
        side = [image_size, image_size]
        self.gray_norms = nn.Sequential(nn.BatchNorm2d(1), nn.LayerNorm([1, *side]))
        self.colored_norms = nn.Sequential(nn.BatchNorm2d(3), nn.LayerNorm([3, *side]))

    def forward(
        self, gray: torch.Tensor, colored: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().forward(self.gray_norms(gray), self.colored_norms(colored))


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

    The concat is (gray, colored), so the gray half is the first. The official formula.
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

    The official example normalises its inputs (MNIST mean/std for gray, CIFAR's for colored);
    we use this data's own training statistics instead of those constants.
    """
    out = dict(data)
    for name in ("gray", "colored"):
        x = data[f"train_{name}"]
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        for split in ("train", "test"):
            out[f"{split}_{name}"] = (data[f"{split}_{name}"] - mean) / std
    return out


def arm_name(placement: str, lambda_rule: str, projection: str = "full") -> str:
    """``regbn-<placement>[-channel][-official]``: suffixes for the channel projection and the
    published code's λ rule; the paper's rule with the full W has none."""
    return (
        f"regbn-{placement}"
        + ("-channel" if projection == "channel" else "")
        + ("-official" if lambda_rule == "official" else "")
    )


def parse_arm(arm: str) -> tuple[str, str]:
    """Inverse of ``arm_name``: (placement, lambda_rule) of a RegBN arm (see ``arm_projection``)."""
    placement = arm.removeprefix("regbn-").removesuffix("-official").removesuffix("-channel")
    if not arm.startswith("regbn-") or placement not in PLACEMENTS:
        raise ValueError(
            f"arm {arm!r} is not 'baseline' nor 'regbn-<placement>[-channel][-official]' with a "
            f"placement in {sorted(PLACEMENTS)}; e.g. 'regbn-input' or 'regbn-late-official'"
        )
    return placement, "official" if arm.endswith("-official") else "paper"


def arm_projection(arm: str) -> str:
    """``"channel"`` for a ``regbn-<placement>-channel[-official]`` arm, else ``"full"``."""
    return "channel" if arm.removesuffix("-official").endswith("-channel") else "full"


def build_model(
    arm: str,
    seed: int,
    example_inputs: tuple[torch.Tensor, torch.Tensor],
    *,
    f_modality: str = "gray",
    regbn_kwargs: dict | None = None,
) -> nn.Module:
    """The official classifier, initialised from ``seed``; RegBN spliced in by ``regbn.insert``.

    ``arm`` is ``"baseline"``, ``"norms-only"`` (`NormsOnlyClassifier`) or
    ``"regbn-<placement>[-official]"`` (see ``arm_name``); the official example's RegBN settings
    apply, updated by ``regbn_kwargs``.
    """
    torch.manual_seed(seed)
    # The norms draw no random numbers: every arm's classifier starts from the same weights.
    side = example_inputs[0].shape[-1]
    model = NormsOnlyClassifier(side) if arm == NORMS_ONLY else CGClassifier()
    model.apply(weight_init)
    if arm in ("baseline", NORMS_ONLY):
        return model
    placement, lambda_rule = parse_arm(arm)
    pair = PLACEMENTS[placement]
    if f_modality == "colored":
        pair = pair[::-1]
    kwargs = {**OFFICIAL_REGBN_KWARGS, "lambda_rule": lambda_rule, **(regbn_kwargs or {})}
    if arm_projection(arm) == "channel":  # only then: the full arms' calls stay as they were
        kwargs["projection"] = "channel"
    return regbn.insert(model, pairs=[pair], example_inputs=example_inputs, **kwargs)


def _clock(step_times: list[float] | None, device: torch.device) -> float:
    """perf_counter when steps are timed (after the device's queued work), else 0."""
    if step_times is None:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
    device: str | torch.device = "cpu",
    step_times: list[float] | None = None,
) -> dict[str, list[float]]:
    """Train one arm with one seed; return per-epoch curves (``<metric>_<modality>``).

    ``seed`` fixes the initialisation and the batch order (a generator of its own), so a run
    does not depend on which other runs the process made before it. A ``step_times`` list
    receives the seconds of each training step (forward, backward and optimiser step; on CUDA
    synchronised); timing changes no number.
    """
    x_gray, x_col, y = data["train_gray"], data["train_colored"], data["train_labels"]
    example = (x_gray[:batch_size].cpu(), x_col[:batch_size].cpu())
    model = build_model(arm, seed, example, f_modality=f_modality, regbn_kwargs=regbn_kwargs)
    # Channels-last images and weights: oneDNN's convolutions and pooling run about a third
    # faster on a CPU than in the default layout (a batch indexed from them stays channels-last).
    model = model.to(device=device, memory_format=torch.channels_last)
    x_gray, x_col, t_gray, t_col = (
        data[k].contiguous(memory_format=torch.channels_last)
        for k in ("train_gray", "train_colored", "test_gray", "test_colored")
    )
    head = model.get_submodule("fc_out")
    # The official optimiser: Adam with betas (0.9, 0.99), its fused kernel (the same update in
    # one pass). RegBN's affine parameters, if any, are part of model.parameters().
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)
    order = torch.Generator().manual_seed(10_000 + seed)
    n = len(y)
    # Drop the last partial batch: RegBN refuses a training batch of 1 (and a tiny batch gives
    # a poor lambda). The reshuffle drops different samples each epoch.
    n_batches = n // batch_size
    has_regbn = bool(_regbn_layers(model))
    curves: dict[str, list[float]] = {"lambda": []} if has_regbn else {}
    bar = tqdm(
        total=epochs * n_batches,
        desc=f"{arm} seed {seed}",
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=order).to(y.device)
        sums = torch.zeros(len(MODALITIES), dtype=torch.float64, device=y.device)
        lambdas: list[float] = []
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            t0 = _clock(step_times, y.device)
            g, c, out = model(x_gray[idx], x_col[idx])
            out_gray, out_colored = modality_logits(head, g, c)
            loss = F.cross_entropy(out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step_times is not None:
                step_times.append(_clock(step_times, y.device) - t0)
            with torch.no_grad():  # the per-modality losses the official example plots
                sums += torch.stack(
                    [loss, F.cross_entropy(out_gray, y[idx]), F.cross_entropy(out_colored, y[idx])]
                ).double()
            lambdas += [
                float(m.last_lambda) for m in _regbn_layers(model) if m.last_lambda is not None
            ]
            bar.update()
        for k, v in zip(MODALITIES, (sums / n_batches).tolist(), strict=True):
            curves.setdefault(f"train_loss_{k}", []).append(v)
        if has_regbn:  # mean lambda+ of the epoch's batches: how hard the constraint binds
            curves["lambda"].append(sum(lambdas) / len(lambdas))
        for k, v in evaluate(model, t_gray, t_col, data["test_labels"]).items():
            curves.setdefault(k, []).append(v)
        bar.set_postfix(
            gray=f"{curves['test_acc_gray'][-1]:.3f}",
            colored=f"{curves['test_acc_colored'][-1]:.3f}",
        )
    bar.close()
    curves["dependence"] = fusion_dependence(model, {"test_gray": t_gray, "test_colored": t_col})
    return curves


def fusion_dependence(
    model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 250
) -> dict[str, float]:
    """How much of the gray features the colored ones explain where the branches fuse, on the
    test digits (`regbn.measure_dependence` at `FUSION_PAIR`, eval mode, nothing changed):
    r2, r2 with the colored rows shuffled, and the difference, the dependence above chance."""
    gray, colored = data["test_gray"], data["test_colored"]
    batches = [
        (gray[i : i + batch_size], colored[i : i + batch_size])
        for i in range(0, len(gray), batch_size)
    ]
    (row,) = regbn.measure_dependence(model, batches, pairs=[FUSION_PAIR], progress=False).rows
    return {
        "r2": row.r2,
        "r2_shuffled": row.r2_shuffled,
        "above_chance": row.r2 - row.r2_shuffled,
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
# (key in the summary, curve, modality, column title) of the printed tables.
COLUMNS = (
    ("acc_fused", "test_acc", "fused", "fused acc."),
    ("acc_gray", "test_acc", "gray", "gray-half acc."),
    ("acc_colored", "test_acc", "colored", "colored-half acc."),
    ("loss_gray", "train_loss", "gray", "gray-half train loss"),
    ("loss_colored", "train_loss", "colored", "colored-half train loss"),
)


DEPENDENCE_KEYS = ("r2", "r2_shuffled", "above_chance")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value), in float64."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summarise(results: dict) -> dict[str, dict[str, dict]]:
    """Final-epoch values per arm and column: mean, std (n − 1) and the per-seed list."""
    table: dict[str, dict[str, dict]] = {}
    for arm, runs in results["arms"].items():
        table[arm] = {}
        for key, metric, mod, _title in COLUMNS:
            finals = [run[f"{metric}_{mod}"][-1] for run in runs["per_seed"]]
            mean, std = _mean_std(finals)
            table[arm][key] = {"mean": mean, "std": std, "per_seed": finals}
        measured = [run["dependence"] for run in runs["per_seed"] if "dependence" in run]
        if measured:
            table[arm]["dependence"] = {}
            for key in DEPENDENCE_KEYS:
                values = [m[key] for m in measured]
                mean, std = _mean_std(values)
                table[arm]["dependence"][key] = {"mean": mean, "std": std, "per_seed": values}
    return table


DEPENDENCE_TITLES = ("fusion r2", "r2 shuffled", "r2 above chance")


def format_table(table: dict[str, dict[str, dict]]) -> str:
    """Two Markdown tables: mean ± std over seeds, then the value of each seed; with the
    dependence at the fusion (r2, shuffled, above chance) where it was measured."""
    measured = all("dependence" in row for row in table.values())
    titles = [c[3] for c in COLUMNS] + (list(DEPENDENCE_TITLES) if measured else [])
    head = "| arm | " + " | ".join(titles) + " |"
    rule = "|---|" + "---:|" * len(titles)
    means = [head, rule]
    seeds = ["| arm, per seed | " + " | ".join(titles) + " |", rule]
    for arm, row in table.items():
        cells = [row[c[0]] for c in COLUMNS]
        if measured:
            cells += [row["dependence"][k] for k in DEPENDENCE_KEYS]
        means.append(
            f"| {arm} | " + " | ".join(f"{v['mean']:.3f} ± {v['std']:.3f}" for v in cells) + " |"
        )
        seeds.append(
            f"| {arm} | "
            + " | ".join(" / ".join(f"{x:.3f}" for x in v["per_seed"]) for v in cells)
            + " |"
        )
    return "\n".join(means) + "\n\n" + "\n".join(seeds)


ARM_COLOURS = {
    "baseline": "tab:gray",
    "norms-only": "tab:olive",
    "regbn-input": "tab:red",
    "regbn-input-official": "tab:orange",
    "regbn-late": "tab:blue",
    "regbn-late-official": "tab:cyan",
    "regbn-conv4": "tab:green",
    "regbn-conv4-channel": "tab:purple",
}


def _reference_lines(axes, arms: list[str]) -> None:
    """The official example's reported final accuracies (MNIST), as dashed lines."""
    for col, mod in ((1, "gray"), (2, "colored")):
        by_value: dict[float, list[str]] = {}
        for arm in arms:
            value = OFFICIAL_REPORTED.get(arm, {}).get(mod)
            if value is not None:
                by_value.setdefault(value, []).append(arm)
        for value, same in by_value.items():
            ax = axes[0, col]
            ax.axhline(value, color=ARM_COLOURS[same[-1]], lw=1.2, ls="--")
            ax.text(
                0.01,
                value + 0.01,
                f"official example (MNIST), {' and '.join(same)}: {value:.2f}",
                transform=ax.get_yaxis_transform(),
                color=ARM_COLOURS[same[-1]],
                fontsize=7,
                va="bottom",
            )


def _plot_dependence(top, bottom, results: dict) -> None:
    """r2 and shuffled r2 at the fusion per arm (top), and their difference (bottom)."""
    arms = list(results["arms"])
    final = summarise(results)
    xs = range(len(arms))
    for key, offset, hatch in (("r2", -0.2, None), ("r2_shuffled", 0.2, "//")):
        top.bar(
            [x + offset for x in xs],
            [final[a]["dependence"][key]["mean"] for a in arms],
            0.4,
            yerr=[final[a]["dependence"][key]["std"] for a in arms],
            color=[ARM_COLOURS.get(a, "tab:gray") for a in arms],
            hatch=hatch,
            edgecolor="k",
            label="r2" if key == "r2" else "r2, colored rows shuffled",
        )
    top.set_title("dependence at the fusion (test digits)")
    top.set_ylabel("share of gray features explained")
    top.legend(fontsize=8)
    bottom.bar(
        list(xs),
        [final[a]["dependence"]["above_chance"]["mean"] for a in arms],
        0.6,
        yerr=[final[a]["dependence"]["above_chance"]["std"] for a in arms],
        color=[ARM_COLOURS.get(a, "tab:gray") for a in arms],
        edgecolor="k",
    )
    bottom.set_title("dependence above chance (r2 − shuffled)")
    for ax in (top, bottom):
        ax.set_xticks(list(xs), arms, rotation=15, fontsize=8)
        ax.grid(alpha=0.3, axis="y")


def plot(results: dict, path: Path) -> None:
    """Test accuracy (top) and training loss (bottom) per modality, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = all("dependence" in run for runs in results["arms"].values()
                   for run in runs["per_seed"])  # fmt: skip
    fig, axes = plt.subplots(2, 4 if measured else 3, figsize=(18 if measured else 14, 7.5))
    for arm, runs in results["arms"].items():
        for row, metric in enumerate(("test_acc", "train_loss")):
            for col, mod in enumerate(MODALITIES):
                curves = torch.tensor([r[f"{metric}_{mod}"] for r in runs["per_seed"]])
                epochs = torch.arange(1, curves.shape[1] + 1)
                mean = curves.mean(0)
                std = curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
                ax = axes[row, col]
                colour = ARM_COLOURS.get(arm)
                ax.plot(epochs, mean, label=arm, color=colour)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color=colour)
    _reference_lines(axes, list(results["arms"]))
    for col, mod in enumerate(MODALITIES):
        axes[0, col].axhline(0.1, color="k", lw=0.8, ls=":", label="chance")
        axes[0, col].set_title(f"test accuracy: {mod}")
        axes[0, col].set_ylim(0, 1)
        axes[1, col].set_title(f"training loss: {mod}")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].grid(alpha=0.3)
        axes[1, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for col in range(len(MODALITIES)):
        axes[1, col].xaxis.get_major_locator().set_params(integer=True)
    if measured:
        _plot_dependence(axes[0, 3], axes[1, 3], results)
    cfg = results["config"]
    fig.suptitle(
        f"Gray + colored digits ({cfg['dataset']}, {cfg['n_train']} train / {cfg['n_test']} "
        f"test; colour = label in train, random in test): mean ± std over "
        f"{len(cfg['seeds'])} seeds; dashed: the official example's reported values on MNIST",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
QUICK = dict(epochs=2, seeds=2, n_train=300, n_test=100)
FULL = dict(epochs=75, n_train=60_000, n_test=10_000)  # the official recipe's size and length
DEFAULT_EPOCHS = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the official example's gray + colored two-branch classifier with "
        "and without RegBN (spliced in by regbn.insert) and plot per-modality test accuracy.",
    )
    p.add_argument(
        "--out",
        default="out/pmr",
        type=Path,
        help="output directory for the figure and JSON (default: out/pmr)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 300 train / 100 test digits, 2 seeds, 2 epochs (< 1 minute)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="the official recipe's length: 60,000 train / 10,000 test digits, 75 epochs "
        "(hours on a CPU; meant for --device cuda)",
    )
    p.add_argument(
        "--placement",
        choices=("input", "late", "conv4", "both", "none"),
        default="input",
        help="where RegBN goes: 'input' = the raw inputs (the official placement, "
        "default), 'late' = the branch features before the concat, 'conv4' = the branches' "
        "last feature maps (64x7x7 each), 'both' = the input and late arms, 'none' = the "
        "baseline alone",
    )
    p.add_argument(
        "--projection",
        choices=("full", "channel", "both"),
        default="full",
        help="RegBN's W: 'full' = the paper's Dg x Df W (default), 'channel' = one Cg x Cf W "
        "shared over spatial positions, 'both' = one arm of each, with --cost",
    )
    p.add_argument(
        "--cost",
        action="store_true",
        help="run each arm in a process of its own that times every training step and "
        "measures its peak resident memory (on with --projection both)",
    )
    p.add_argument(
        "--lambda-rule",
        choices=("paper", "official", "both"),
        default="paper",
        help="RegBN's rule for lambda (default: paper; 'official' reproduces the published "
        "code; 'both' runs one arm of each)",
    )
    p.add_argument(
        "--f-modality",
        choices=("gray", "colored"),
        default="gray",
        help="which modality is f (normalised w.r.t. the other); the official example uses "
        "gray (default)",
    )
    p.add_argument(
        "--epochs", type=int, help=f"epochs per run (default {DEFAULT_EPOCHS}; 75 with --full)"
    )
    p.add_argument("--seeds", type=int, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument(
        "--batch-size", type=int, default=50, help="batch size (default 50, the official one)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--mnist",
        metavar="DIR",
        help="use the MNIST IDX files in DIR (raw or .gz) instead of the grown scikit-learn digits",
    )
    p.add_argument(
        "--palette",
        choices=sorted(PALETTES),
        default=DEFAULT_PALETTE,
        help=f"the ten class colours (default {DEFAULT_PALETTE}; 'primary' is the saturated "
        "set of earlier versions, a near-perfect shortcut)",
    )
    p.add_argument(
        "--jitter-var",
        type=float,
        default=DEFAULT_JITTER_VAR,
        help=f"variance of the per-image colour jitter (default {DEFAULT_JITTER_VAR}, the "
        "official example's; its loader's other file has 0.03)",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the data: split, transforms and colours (default 0)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        help=f"training digits (default {DEFAULT_N_TRAIN:,} grown; with --mnist a cap)",
    )
    p.add_argument(
        "--n-test", type=int, help=f"test digits (default {DEFAULT_N_TEST:,}; with --mnist a cap)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; recorded)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    args = p.parse_args(argv)
    args.cost = args.cost or args.projection == "both"
    preset = QUICK if args.quick else FULL if args.full else {}
    for key, default in (
        ("epochs", DEFAULT_EPOCHS),
        ("seeds", 3),
        ("n_train", None),
        ("n_test", None),
    ):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if args.epochs < 1 or args.seeds < 1 or args.batch_size < 2 or args.threads < 1:
        p.error("--epochs, --seeds and --threads must be >= 1 and --batch-size >= 2")
    for key in ("n_train", "n_test"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return args


def arms_of(placement: str, lambda_rule: str, projection: str = "full") -> list[str]:
    """The baseline, the norms-only arm where RegBN goes on the inputs, then one RegBN arm per
    (placement, projection, λ rule) asked for."""
    placements = {"both": ("input", "late"), "none": ()}.get(placement, (placement,))
    rules = ("paper", "official") if lambda_rule == "both" else (lambda_rule,)
    projections = PROJECTIONS if projection == "both" else (projection,)
    return [
        "baseline",
        *([NORMS_ONLY] if "input" in placements and projection != "both" else []),
        *(arm_name(p, r, j) for p in placements for j in projections for r in rules),
    ]


def make_deterministic(threads: int, device: torch.device) -> None:
    """Fixed thread count and deterministic kernels: equal numbers run to run."""
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    import matplotlib
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
        "regbn": _package_version("regbn"),
    }


def _numeric_argv(argv: list[str]) -> list[str]:
    """The command-line arguments without those that cannot change a number (--out, bars)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not (a.startswith("--out=") or a == "--no-progress"):
            kept.append(a)
    return kept


def make_config(args: argparse.Namespace, data: dict, arms: list[str]) -> dict:
    pairs = {}
    for arm in arms[1:]:
        if arm == NORMS_ONLY:
            continue
        pair = PLACEMENTS[parse_arm(arm)[0]]
        pairs[arm] = list(pair if args.f_modality == "gray" else pair[::-1])
    return {
        "command": " ".join(["python examples/pmr_colored_digits.py", *_numeric_argv(args.argv)]),
        "dataset": f"MNIST ({args.mnist})" if args.mnist else "scikit-learn digits, grown",
        "n_train": len(data["train_labels"]),
        "n_test": len(data["test_labels"]),
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "Adam(betas=(0.9, 0.99))",
        "split_seed": args.split_seed,
        "palette": args.palette,
        "jitter_var": args.jitter_var,
        "augmentation": None if args.mnist else dataclasses.asdict(Augmentation()),
        "f_modality": args.f_modality,
        "arms": arms,
        "pairs": pairs,
        "regbn_kwargs": OFFICIAL_REGBN_KWARGS,
        "dependence": {
            "pair": list(FUSION_PAIR),
            "on": "the test digits, after training, eval mode",
            "measure": "regbn.measure_dependence: r2 of f by g, and with g's rows shuffled",
        },
        # Recorded only where asked, so that the default command's JSON stays as it was.
        **({"projection": args.projection} if args.projection != "full" else {}),
        **({"cost": COST_METHOD} if args.cost else {}),
        "quick": args.quick,
        "full": args.full,
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


# --------------------------------------------------------------------------------------------
# Cost per arm: time per training step and peak memory, each arm in a process of its own
# --------------------------------------------------------------------------------------------
COST_METHOD = (
    "each arm's seeds run in a spawned process of their own; step_ms: median over every "
    "training step of the arm (forward, backward, optimiser step); peak_rss_delta_mib: the "
    "process's peak resident set during training minus its resident set just before (Linux: "
    "the peak reset through /proc/self/clear_refs once the data are loaded); "
    "regbn_buffer_mib: the RegBN layer's buffers (W and its running state; a training step "
    "also keeps one scratch tensor of W's size)"
)


def _proc_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(ln.split()[1]) for ln in lines if ln.startswith(field + ":")), None)


def _reset_peak_rss() -> int | None:
    """Reset the peak resident set to the current one; the current one in KiB, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_kib("VmRSS")


def _regbn_buffer_bytes(arm: str, data: dict, batch_size: int, f_modality: str) -> int:
    """Bytes of the RegBN layer's buffers (W, Adam moments, λ history) in the arm's model."""
    if arm == "baseline":
        return 0
    example = (data["train_gray"][:batch_size].cpu(), data["train_colored"][:batch_size].cpu())
    model = build_model(arm, 0, example, f_modality=f_modality)
    return sum(b.numel() * b.element_size() for m in _regbn_layers(model) for b in m.buffers())


def _arm_worker(conn, arm: str, data_path: str, opts: dict) -> None:
    """Spawned: train ``arm`` for every seed; send its curves, step times and peak memory."""
    try:
        device = torch.device(opts["device"])
        make_deterministic(opts["threads"], device)
        data = {k: v.to(device) for k, v in torch.load(data_path).items()}
        before = _reset_peak_rss()
        times: list[float] = []
        per_seed = []
        for seed in opts["seeds"]:
            t0 = time.perf_counter()
            curves = train_run(arm, seed, data, step_times=times, **opts["train"])
            curves["seconds"] = time.perf_counter() - t0
            per_seed.append(curves)
        peak = _proc_kib("VmHWM")
        cost = {
            "step_ms": 1e3 * statistics.median(times),
            "step_ms_per_seed": [
                1e3 * statistics.median(chunk) for chunk in _chunks(times, len(opts["seeds"]))
            ],
            "peak_rss_delta_mib": None if before is None or peak is None
            else (peak - before) / 1024,
            "regbn_buffer_mib": _regbn_buffer_bytes(
                arm, data, opts["train"]["batch_size"], opts["train"]["f_modality"]
            ) / 2**20,
        }
        conn.send({"per_seed": per_seed, "cost": cost})
    except BaseException as exc:  # the parent re-raises it with the arm's name
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _chunks(values: list[float], n: int) -> list[list[float]]:
    """``values`` cut into ``n`` equal consecutive parts (one per seed)."""
    size = len(values) // n
    return [values[i * size : (i + 1) * size] for i in range(n)]


def run_all_costed(args: argparse.Namespace, data: dict, arms: list[str]) -> dict:
    """``run_all`` with every arm in a spawned process of its own, which also measures cost.

    Each run seeds its own initialisation and batch order, so its curves are those of the
    sequential command.
    """
    results: dict = {"config": make_config(args, data, arms), "arms": {}, "cost": {}}
    opts = {
        "device": str(args.device),
        "threads": args.threads,
        "seeds": list(range(args.seeds)),
        "train": dict(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            f_modality=args.f_modality,
            progress=not args.no_progress,
        ),
    }
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "data.pt")
        torch.save({k: v.cpu() for k, v in data.items()}, data_path)
        for arm in tqdm(arms, desc="arms", unit="arm", disable=args.no_progress):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_arm_worker, args=(child, arm, data_path, opts))
            proc.start()
            child.close()
            reply = parent.recv()
            proc.join()
            if "error" in reply:
                raise RuntimeError(f"arm {arm}: {reply['error']}")
            results["arms"][arm] = {"seeds": opts["seeds"], "per_seed": reply["per_seed"]}
            results["cost"][arm] = reply["cost"]
    results["wall_time_s"] = time.perf_counter() - start
    results["final"] = summarise(results)
    return results


def format_cost(cost: dict[str, dict]) -> str:
    """A Markdown table of the cost per arm (``run_all_costed``)."""

    def mib(v: float | None) -> str:
        return "not measured" if v is None else f"{v:.1f}"

    rows = [
        "| arm | time per step (ms, median) | per seed | peak RSS Δ in training (MiB) "
        "| RegBN buffers (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, c in cost.items():
        rows.append(
            f"| {arm} | {c['step_ms']:.1f} | "
            + " / ".join(f"{t:.1f}" for t in c["step_ms_per_seed"])
            + f" | {mib(c['peak_rss_delta_mib'])} | {c['regbn_buffer_mib']:.2f} |"
        )
    return "\n".join(rows)


def run_all(args: argparse.Namespace, data: dict, arms: list[str]) -> dict:
    """Every (arm, seed) run, in that order; per-run curves and seconds."""
    if args.cost:
        return run_all_costed(args, data, arms)
    results: dict = {"config": make_config(args, data, arms), "arms": {}}
    start = time.perf_counter()
    runs = [(arm, seed) for arm in arms for seed in range(args.seeds)]
    outer = tqdm(runs, desc="runs", unit="run", disable=args.no_progress, dynamic_ncols=True)
    for arm, seed in outer:
        t0 = time.perf_counter()
        curves = train_run(
            arm,
            seed,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            f_modality=args.f_modality,
            progress=not args.no_progress,
            device=args.device,
        )
        curves["seconds"] = time.perf_counter() - t0
        entry = results["arms"].setdefault(arm, {"seeds": [], "per_seed": []})
        entry["seeds"].append(seed)
        entry["per_seed"].append(curves)
    outer.close()
    results["wall_time_s"] = time.perf_counter() - start
    results["final"] = summarise(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    make_deterministic(args.threads, device)
    try:
        raw = build_colored_digits(
            args.split_seed,
            args.mnist,
            n_train=args.n_train,
            n_test=args.n_test,
            jitter_var=args.jitter_var,
            palette=args.palette,
        )
    except ValueError as exc:
        print(f"pmr_colored_digits: error: {exc}", file=sys.stderr)
        return 2
    if len(raw["train_labels"]) < args.batch_size:
        print(
            f"pmr_colored_digits: error: {len(raw['train_labels'])} training samples are fewer "
            f"than one batch of {args.batch_size}; raise --n-train or lower --batch-size",
            file=sys.stderr,
        )
        return 2
    data = {k: v.to(device) for k, v in standardise(raw).items()}
    arms = arms_of(args.placement, args.lambda_rule, args.projection)
    results = run_all(args, data, arms)

    args.out.mkdir(parents=True, exist_ok=True)
    fig_path = args.out / "pmr_colored_digits.png"
    json_path = args.out / "pmr_colored_digits.json"
    plot(results, fig_path)
    json_path.write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    print(
        f"\nAfter {args.epochs} epochs, {len(cfg['seeds'])} seeds ({cfg['n_train']} train / "
        f"{cfg['n_test']} test, {cfg['threads']} threads, torch {torch.__version__}); "
        f"mean ± std (n − 1):\n"
    )
    print(format_table(results["final"]))
    if "cost" in results:
        print("\nCost per arm (each arm in a process of its own):\n")
        print(format_cost(results["cost"]))
    print(f"\nwall time {results['wall_time_s']:.0f} s; wrote {fig_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

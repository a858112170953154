"""Colored digits: an offline stand-in for the seed's gray + colored MNIST pair.

The seed's PMR example trains on MNIST (gray) paired with the 10-colour "colored MNIST" of
Kim et al. (Learning Not to Learn, CVPR 2019): each digit is painted with its class colour plus
Gaussian jitter in training, while in the test split the colour is random. The colour is thus a
confounder: a shortcut that predicts the label in training and carries no label information at
test time.

Neither dataset can be downloaded here, so by default we build the same pair from the 1,797
8x8 digits that ship inside scikit-learn (``load_digits``), upsampled to 28x28. ``--mnist DIR``
(or ``mnist_dir=``) reads a local MNIST in its IDX files instead, with plain numpy.

Run ``python examples/colored_digits.py`` for a summary, ``--preview grid.png`` for a picture.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PALETTE",
    "build_colored_digits",
    "colorize",
    "colour_label_agreement",
    "load_mnist_idx",
    "read_idx",
]

# Ten class colours (RGB in [0, 1]). Far enough apart that, with the default jitter
# (sigma = sqrt(0.02) ~ 0.14 per channel), the colour alone identifies the class in training for
# almost every sample; none is black, which would hide the digit on its black background.
PALETTE = torch.tensor(
    [
        [1.0, 0.0, 0.0],  # 0 red
        [0.0, 1.0, 0.0],  # 1 green
        [0.0, 0.0, 1.0],  # 2 blue
        [1.0, 1.0, 0.0],  # 3 yellow
        [1.0, 0.0, 1.0],  # 4 magenta
        [0.0, 1.0, 1.0],  # 5 cyan
        [1.0, 1.0, 1.0],  # 6 white
        [1.0, 0.5, 0.0],  # 7 orange
        [0.5, 0.0, 1.0],  # 8 violet
        [0.5, 0.5, 0.5],  # 9 gray
    ]
)

IMAGE_SIZE = 28

# IDX file stems of the four MNIST files; ``-`` or ``.`` before "idx" (both spellings circulate),
# with or without ``.gz``.
_MNIST_FILES = {
    "train_images": ("train-images", "idx3-ubyte"),
    "train_labels": ("train-labels", "idx1-ubyte"),
    "test_images": ("t10k-images", "idx3-ubyte"),
    "test_labels": ("t10k-labels", "idx1-ubyte"),
}
# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------
# MNIST IDX reader
# --------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into a numpy array.

    Raises ValueError with the file name when the header or size does not match the format.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:  # gzip errors are OSError subclasses
        raise ValueError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path} is not an IDX file (type code {type_code:#x}, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated (header needs {header} bytes, got {len(data)})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} has {len(data)} bytes but its header {shape} says {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # native byte order for torch


def _find_mnist_file(root: Path, stem: str, suffix: str) -> Path:
    names = [f"{stem}{sep}{suffix}{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise ValueError(f"MNIST directory {root} has no {names[0]} (nor .gz / '.idx' variants)")


def load_mnist_idx(mnist_dir: str | Path) -> dict[str, np.ndarray]:
    """Load the four MNIST IDX files from ``mnist_dir`` (raw or .gz).

    Returns ``train_images`` (N, 28, 28) uint8, ``train_labels`` (N,), and the ``test_`` pair.
    Raises ValueError with one clear sentence for a missing or malformed directory.
    """
    root = Path(mnist_dir)
    if not root.is_dir():
        raise ValueError(f"MNIST directory {root} does not exist or is not a directory")
    out = {key: read_idx(_find_mnist_file(root, *parts)) for key, parts in _MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} split in {root} is malformed: images {images.shape}, "
                f"labels {labels.shape} (expected (N, H, W) and (N,))"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"MNIST {split} labels in {root} are outside 0..9")
    return out


# --------------------------------------------------------------------------------------------
# Building the pair
# --------------------------------------------------------------------------------------------
def _to_28(images: np.ndarray, max_value: float) -> torch.Tensor:
    """(N, H, W) integers -> (N, 1, 28, 28) float32 in [0, 1] (bilinear when H, W != 28)."""
    x = torch.as_tensor(images.astype(np.float32) / max_value).unsqueeze(1)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def colorize(
    gray: torch.Tensor,
    colour_index: torch.Tensor,
    generator: torch.Generator,
    jitter_var: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint each (1, H, W) digit with ``PALETTE[colour_index]`` plus Gaussian jitter.

    The jitter is one colour offset per image (variance ``jitter_var`` per channel, as in the
    colored MNIST of Kim et al.), clipped to [0, 1]. Returns the (N, 3, H, W) images and the
    (N, 3) colours used.
    """
    base = PALETTE[colour_index]
    jitter = torch.randn(base.shape, generator=generator) * jitter_var**0.5
    colours = (base + jitter).clamp_(0.0, 1.0)
    return gray * colours[:, :, None, None], colours


def _stratified_split(
    labels: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Shuffle across classes too, so a sequential batch never holds a single class.
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=generator)]
    return train_idx, test_idx


def build_colored_digits(
    split_seed: int = 0,
    mnist_dir: str | Path | None = None,
    *,
    test_fraction: float = 0.25,
    jitter_var: float = 0.02,
    max_train: int | None = None,
    max_test: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build the gray / colored digit pair.

    Args:
        split_seed: seeds the train/test split (scikit-learn digits) and the colours; the same
            seed always gives bit-identical tensors.
        mnist_dir: a directory with the four MNIST IDX files (raw or .gz). ``None`` uses
            scikit-learn's ``load_digits`` upsampled to 28x28.
        test_fraction: share of each class held out for test (digits only; MNIST keeps its own
            split).
        jitter_var: variance of the per-image colour jitter.
        max_train, max_test: optional caps (random subsets), handy for a quick MNIST run.

    Returns a dict of tensors: ``train_gray`` / ``test_gray`` (N, 1, 28, 28) float32 in [0, 1],
    ``train_colored`` / ``test_colored`` (N, 3, 28, 28) float32 in [0, 1], ``train_labels`` /
    ``test_labels`` (N,) int64, ``train_colour_index`` / ``test_colour_index`` (N,) int64 (the
    palette entry painted: the label in training, random in test), and ``palette`` (10, 3).

    Raises ValueError for a missing or malformed ``mnist_dir``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(split_seed)
    if mnist_dir is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray_all = _to_28(digits.images, 16.0)  # load_digits pixels are 0..16
        labels_all = torch.as_tensor(digits.target, dtype=torch.int64)
        train_idx, test_idx = _stratified_split(labels_all, test_fraction, gen)
        splits = {
            "train": (gray_all[train_idx], labels_all[train_idx]),
            "test": (gray_all[test_idx], labels_all[test_idx]),
        }
    else:
        raw = load_mnist_idx(mnist_dir)
        splits = {
            split: (
                _to_28(raw[f"{split}_images"], 255.0),
                torch.as_tensor(raw[f"{split}_labels"].astype(np.int64)),
            )
            for split in ("train", "test")
        }

    out: dict[str, torch.Tensor] = {"palette": PALETTE.clone()}
    for split, cap in (("train", max_train), ("test", max_test)):
        gray, labels = splits[split]
        if cap is not None and cap < len(labels):
            keep = torch.randperm(len(labels), generator=gen)[:cap]
            gray, labels = gray[keep], labels[keep]
        if split == "train":
            colour_index = labels.clone()  # the colour follows the label: a shortcut
        else:
            colour_index = torch.randint(0, 10, labels.shape, generator=gen)  # no label info
        colored, _ = colorize(gray, colour_index, gen, jitter_var)
        out[f"{split}_gray"] = gray.contiguous()
        out[f"{split}_colored"] = colored.contiguous()
        out[f"{split}_labels"] = labels.contiguous()
        out[f"{split}_colour_index"] = colour_index
    return out


def colour_label_agreement(
    colored: torch.Tensor, gray: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction of images whose nearest palette colour is their label's colour.

    Each image's colour is recovered exactly by least squares, colored = gray * colour, then
    snapped to the nearest palette entry. About 1 when the colour follows the label (a little
    less, because of the jitter), about 0.1 (chance) when it is random.
    """
    g = gray.flatten(1).unsqueeze(1)  # (N, 1, HW)
    colour = (colored.flatten(2) * g).sum(-1) / (g * g).sum(-1).clamp_min(1e-12)  # (N, 3)
    nearest = torch.cdist(colour, PALETTE.to(colour)).argmin(dim=1)
    return float((nearest == labels).float().mean())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _save_preview(data: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 10, figsize=(10, 3.3))
    for col in range(10):
        i = int(torch.nonzero(data["train_labels"] == col)[0])
        j = int(torch.nonzero(data["test_labels"] == col)[0])
        axes[0, col].imshow(data["train_gray"][i, 0], cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(data["train_colored"][i].permute(1, 2, 0))
        axes[2, col].imshow(data["test_colored"][j].permute(1, 2, 0))
        axes[0, col].set_title(str(col))
    for row, name in enumerate(["gray", "train colored", "test colored"]):
        axes[row, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the gray + colored digits pair and print a summary.",
    )
    parser.add_argument(
        "--mnist",
        metavar="DIR",
        help="directory with the four MNIST IDX files (raw or .gz) to use instead of "
        "scikit-learn's 8x8 digits",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and colour seed (default 0)")
    parser.add_argument(
        "--jitter-var", type=float, default=0.02, help="colour jitter variance (default 0.02)"
    )
    parser.add_argument("--preview", metavar="PNG", help="also save a grid of examples here")
    args = parser.parse_args(argv)
    try:
        data = build_colored_digits(args.seed, args.mnist, jitter_var=args.jitter_var)
    except ValueError as exc:
        # One clear line, no traceback: this is a user error, not a bug.
        print(f"colored_digits: error: {exc}", file=sys.stderr)
        return 2
    for split in ("train", "test"):
        agree = colour_label_agreement(
            data[f"{split}_colored"], data[f"{split}_gray"], data[f"{split}_labels"]
        )
        print(
            f"{split:5s}: gray {tuple(data[f'{split}_gray'].shape)}, "
            f"colored {tuple(data[f'{split}_colored'].shape)}, "
            f"colour names the label for {agree:.1%}"
        )
    if args.preview:
        _save_preview(data, Path(args.preview))
        print(f"preview written to {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Colored digits: an offline stand-in for the official example's gray + colored MNIST pair.

The official RegBN PMR example (mogvision/regbn, ``example_PMR``) trains on MNIST (gray) paired
with the 10-colour "colored MNIST" of Kim et al. (Learning Not to Learn, CVPR 2019): each digit
is painted with its class colour plus Gaussian jitter (variance 0.02 per channel) in training,
while in the test split the colour is random. The colour is thus a confounder: a shortcut that
predicts the label in training and carries no label information at test time.

Neither dataset can be downloaded here, so by default we grow the 1,797 8x8 digits that ship
inside scikit-learn (``load_digits``) into an MNIST-like set:

1. each digit is upsampled (bicubic) to 20x20 and centred in 28x28, as MNIST's are;
2. the originals are split by class into train (75 %) and test (25 %) *before* anything else,
   so no test digit is a transform of a training digit;
3. each split is grown on its own to ``n_train`` (default 10,000) and ``n_test`` (2,000)
   digits, each a random label-preserving transform of one original: affine (rotation,
   scale, shear, shift), a smooth elastic displacement and a thicker or thinner stroke
   (``Augmentation``). Pure torch on the CPU with one seeded generator: bit-identical output
   for a given ``split_seed``;
4. each digit is painted with its class colour plus jitter (variance 0.02 per channel) in
   training and a random palette colour at test. The default palette (``"pastel"``) is ten
   hues 36 degrees apart at saturation 0.6: under the jitter the colour alone names the label
   for about 69 % of the training digits. A strong shortcut, not a perfect one: with the
   saturated ``"primary"`` palette (96 %) the colour alone carries the training loss and the
   baseline's gray branch never learns, unlike on colored MNIST.

How it differs from MNIST: about 1,350 distinct training digits from a few dozen writers instead
of 60,000 from about 250, all drawn from 8x8 bitmaps (blurrier strokes, less variety in style),
10,000 training images instead of 60,000, and our own ten class colours (the exact colours of
Kim et al.'s files are not available here). ``--mnist DIR`` (or ``mnist_dir=``) reads a local
MNIST in its IDX files instead, with plain numpy, and paints it the same way.

Run ``python examples/colored_digits.py`` for a summary, ``--preview grid.png`` for a picture.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_JITTER_VAR",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "DEFAULT_PALETTE",
    "PALETTE",
    "PALETTES",
    "STRONG_AUGMENTATION",
    "Augmentation",
    "augment",
    "build_colored_digits",
    "grow",
    "hue_palette",
    "resolve_palette",
    "sklearn_digits_28",
    "colorize",
    "colour_label_agreement",
    "load_mnist_idx",
    "read_idx",
]

def hue_palette(saturation: float, value: float = 0.9) -> torch.Tensor:
    """Ten colours (10, 3) in [0, 1]: hues 0°, 36°, …, 324° at one saturation and value (HSV)."""
    import colorsys

    rows = [colorsys.hsv_to_rgb(i / 10, saturation, value) for i in range(10)]
    return torch.tensor(rows, dtype=torch.float64).float()


# The class colours (RGB in [0, 1]), one per label. None is black, which would hide the digit
# on its black background.
PALETTES: dict[str, torch.Tensor] = {
    # The default: ten hues around the colour wheel at saturation 0.6 and value 0.9. Neighbours
    # are 0.24 to 0.32 apart, so the jitter (sigma = sqrt(0.02) ~ 0.14 per channel) blurs a colour
    # into its neighbours' often enough that the colour alone names the label for about
    # two thirds of the training digits: a strong shortcut, but one that leaves the shape worth
    # learning, as on colored MNIST, where the gray branch learns the digits in both arms.
    "pastel": hue_palette(0.6),
    # The ten saturated colours of earlier versions: far enough apart that the colour alone
    # names the label for 96 % of the training digits. The fused loss falls to ~0.02 on the
    # colour alone and the baseline's gray branch never learns (its half stays at chance).
    "primary": torch.tensor(
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
    ),
}
DEFAULT_PALETTE = "pastel"
PALETTE = PALETTES[DEFAULT_PALETTE]  # the default palette's colours
DEFAULT_JITTER_VAR = 0.02

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
# Growing scikit-learn's digits into an MNIST-sized set
# --------------------------------------------------------------------------------------------
# MNIST draws each digit in a 20x20 box centred in 28x28; we place the upsampled 8x8 digits the
# same way, so that rotations and shifts keep the whole digit on the canvas.
_DIGIT_BOX = 20
# Default sizes of the grown set: enough distinct training digits, and enough steps per epoch,
# for the baseline's gray branch to learn the digits despite the colour shortcut (as on MNIST).
DEFAULT_N_TRAIN = 10_000
DEFAULT_N_TEST = 2_000


@dataclass(frozen=True)
class Augmentation:
    """Strength of the label-preserving transforms that grow the digits.

    Every digit gets one random affine map (rotation in ±``rotate_deg``, isotropic scale in
    ``scale``, a shear of ±``shear`` (tan of the angle), a shift of ±``shift_px`` pixels per
    axis), a smooth elastic displacement (Simard et al. 2003: uniform noise blurred by a Gaussian
    of ``elastic_sigma_px``, scaled to at most about ``elastic_px`` pixels) and a stroke-width
    change (a blend towards the 3x3 max-pool, thicker, or the 3x3 min-pool, thinner, by a
    uniform weight in ±``stroke``).

    The defaults are moderate: a gray branch alone learns these digits to 0.9 test accuracy in
    about 400 steps, as it learns MNIST within a few hundred. With ``STRONG_AUGMENTATION``, the
    earlier default, it needs about 800 steps alone and, beside the colour shortcut, more than
    the 1,200 steps of the default run.
    """

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 0.15
    shift_px: float = 1.5
    elastic_px: float = 1.0
    elastic_sigma_px: float = 4.0
    stroke: float = 0.5


STRONG_AUGMENTATION = Augmentation(
    rotate_deg=15.0, scale=(0.8, 1.15), shear=0.25, shift_px=2.0, elastic_px=1.5, stroke=1.0
)


def sklearn_digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 28, 28) float32 in [0, 1], and the labels.

    Bicubic upsampling to 20x20 (clipped to [0, 1]), padded to 28x28 as MNIST is.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels 0..16
    x = F.interpolate(x, size=(_DIGIT_BOX, _DIGIT_BOX), mode="bicubic", align_corners=False)
    pad = (IMAGE_SIZE - _DIGIT_BOX) // 2
    x = F.pad(x.clamp_(0.0, 1.0), (pad, pad, pad, pad))
    return x.contiguous(), torch.as_tensor(digits.target, dtype=torch.int64)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), zero padding, radius 2 sigma."""
    radius = max(1, round(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _affine_theta(n: int, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) ``affine_grid`` matrices: output coordinates -> input coordinates.

    The forward map is shift ∘ rotation ∘ shear ∘ scale; its inverse is what grid_sample needs.
    Built in float64, returned as float32.
    """
    angle = torch.deg2rad(_uniform(n, -aug.rotate_deg, aug.rotate_deg, gen))
    scale = _uniform(n, *aug.scale, gen)
    shear = _uniform(n, -aug.shear, aug.shear, gen)
    shift = _uniform(2 * n, -aug.shift_px, aug.shift_px, gen).view(n, 2) * 2 / IMAGE_SIZE
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = shear
    forward = rot @ shr * scale[:, None, None]
    inverse = torch.linalg.inv(forward)
    offset = -(inverse @ shift.unsqueeze(-1))
    return torch.cat([inverse, offset], dim=2).float()


def _stroke(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Thicker strokes for amount > 0 (towards a 3x3 dilation), thinner for amount < 0."""
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    a = amount.view(-1, 1, 1, 1)
    return torch.where(a >= 0, x + a * (thick - x), x + a * (x - thin))


def augment(
    images: torch.Tensor, gen: torch.Generator, aug: Augmentation = Augmentation()
) -> torch.Tensor:
    """One random label-preserving transform of each (N, 1, 28, 28) digit (see Augmentation).

    Pure torch on the CPU, so the result depends on ``gen``'s state alone.
    """
    n = len(images)
    x = _stroke(images, _uniform(n, -aug.stroke, aug.stroke, gen).float())
    grid = F.affine_grid(
        _affine_theta(n, aug, gen), [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False
    )
    if aug.elastic_px > 0:
        noise = torch.rand(n, 2, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
        field = _gaussian_blur(noise, aug.elastic_sigma_px)
        # Blurred uniform noise has a small spread; scale its largest value to elastic_px.
        field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        grid = grid + field.permute(0, 2, 3, 1) * (aug.elastic_px * 2 / IMAGE_SIZE)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)


def grow(
    originals: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    gen: torch.Generator,
    aug: Augmentation = Augmentation(),
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` transformed digits, each original used ⌊n/N⌋ or ⌈n/N⌉ times, in random order.

    Returns the (n, 1, 28, 28) digits, their (n,) labels and the (n,) row of ``originals``
    each was made from.
    """
    source = torch.arange(n) % len(originals)
    source = source[torch.randperm(n, generator=gen)]
    parts = [augment(originals[source[i : i + chunk]], gen, aug) for i in range(0, n, chunk)]
    return torch.cat(parts).contiguous(), labels[source].contiguous(), source


# --------------------------------------------------------------------------------------------
# Building the pair
# --------------------------------------------------------------------------------------------
def _to_28(images: np.ndarray, max_value: float) -> torch.Tensor:
    """(N, H, W) integers -> (N, 1, 28, 28) float32 in [0, 1] (bilinear when H, W != 28)."""
    x = torch.as_tensor(images.astype(np.float32) / max_value).unsqueeze(1)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def resolve_palette(palette: str | torch.Tensor) -> torch.Tensor:
    """A palette's (10, 3) colours: a name in ``PALETTES`` or the colours themselves."""
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(f"palette {palette!r} is not one of {sorted(PALETTES)}")
        return PALETTES[palette]
    colours = torch.as_tensor(palette, dtype=torch.float32)
    if colours.shape != (10, 3) or not bool(((colours >= 0) & (colours <= 1)).all()):
        raise ValueError(
            f"a palette is ten RGB colours in [0, 1], got shape {tuple(colours.shape)}"
        )
    return colours


def colorize(
    gray: torch.Tensor,
    colour_index: torch.Tensor,
    generator: torch.Generator,
    jitter_var: float = DEFAULT_JITTER_VAR,
    palette: str | torch.Tensor = DEFAULT_PALETTE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint each (1, H, W) digit with ``palette[colour_index]`` plus Gaussian jitter.

    The jitter is one colour offset per image (variance ``jitter_var`` per channel, as in the
    colored MNIST of Kim et al. that the official example loads as ``jitter_var_0.020`` or
    ``0.030``), clipped to [0, 1]. Returns the (N, 3, H, W) images and the (N, 3) colours used.
    """
    base = resolve_palette(palette)[colour_index]
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


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _alias(name: str, value: int | None, old_name: str, old_value: int | None) -> int | None:
    if old_value is None:
        return value
    if value is not None:
        raise ValueError(
            f"{old_name}={old_value!r} is the older name of {name}={value!r}; give only {name}"
        )
    return old_value


def _digits_splits(
    gen: torch.Generator,
    n_train: int | None,
    n_test: int | None,
    test_fraction: float,
    aug: Augmentation | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits split by original digit, then each split grown on its own.

    Each split is (digits, labels, the index in ``load_digits`` of each digit's original).
    """
    gray_all, labels_all = sklearn_digits_28()
    train_idx, test_idx = _stratified_split(labels_all, test_fraction, gen)
    splits = {}
    for split, idx, n, default in (
        ("train", train_idx, n_train, DEFAULT_N_TRAIN),
        ("test", test_idx, n_test, DEFAULT_N_TEST),
    ):
        if aug is None:  # the originals themselves, capped at n
            idx = idx[:n]
            splits[split] = (gray_all[idx], labels_all[idx], idx)
        else:
            gray, labels, rows = grow(gray_all[idx], labels_all[idx], n or default, gen, aug)
            splits[split] = (gray, labels, idx[rows])
    return splits


def _mnist_splits(
    mnist_dir: str | Path, gen: torch.Generator, n_train: int | None, n_test: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    raw = load_mnist_idx(mnist_dir)
    splits = {}
    for split, cap in (("train", n_train), ("test", n_test)):
        gray = _to_28(raw[f"{split}_images"], 255.0)
        labels = torch.as_tensor(raw[f"{split}_labels"].astype(np.int64))
        keep = torch.arange(len(labels))
        if cap is not None and cap < len(labels):
            keep = torch.randperm(len(labels), generator=gen)[:cap]
        splits[split] = (gray[keep], labels[keep], keep)
    return splits


def build_colored_digits(
    split_seed: int = 0,
    mnist_dir: str | Path | None = None,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.25,
    jitter_var: float = DEFAULT_JITTER_VAR,
    palette: str | torch.Tensor = DEFAULT_PALETTE,
    augmentation: Augmentation | None = Augmentation(),
    max_train: int | None = None,
    max_test: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build the gray / colored digit pair.

    Args:
        split_seed: seeds the split, the transforms and the colours (one ``torch.Generator``);
            the same seed always gives bit-identical tensors.
        mnist_dir: a directory with the four MNIST IDX files (raw or .gz). ``None`` grows
            scikit-learn's digits (see ``grow``): they are split by original digit first
            (``test_fraction`` of each class to test), so no test digit is a transform of a
            training digit.
        n_train, n_test: how many digits each split has. scikit-learn's digits: how many are
            grown (default 10,000 and 2,000), or a cap on the originals when ``augmentation`` is
            None. MNIST: a cap (a random subset; default all).
        test_fraction: share of each class's original digits held out for test.
        jitter_var: variance of the per-image colour jitter (0.02, the official example's
            text; its loader's other file has 0.03).
        palette: the ten class colours, a name in ``PALETTES`` (default ``"pastel"``) or a
            (10, 3) tensor in [0, 1].
        augmentation: the transforms' strength; None keeps scikit-learn's 1,797 originals.
        max_train, max_test: older names of ``n_train`` and ``n_test`` (give one or the other).

    Returns a dict of tensors: ``train_gray`` / ``test_gray`` (N, 1, 28, 28) float32 in [0, 1],
    ``train_colored`` / ``test_colored`` (N, 3, 28, 28) float32 in [0, 1], ``train_labels`` /
    ``test_labels`` (N,) int64, ``train_colour_index`` / ``test_colour_index`` (N,) int64 (the
    palette entry painted: the label in training, random in test), ``train_source`` /
    ``test_source`` (N,) int64 (the original each digit was made from: its index in
    ``load_digits``, or in its MNIST split), and ``palette`` (10, 3), the colours painted.

    Raises ValueError for a bad size or fraction and for a missing or malformed ``mnist_dir``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got {test_fraction}; 0.25 holds out a quarter"
        )
    n_train = _alias("n_train", n_train, "max_train", max_train)
    n_test = _alias("n_test", n_test, "max_test", max_test)
    _check_size("n_train", n_train)
    _check_size("n_test", n_test)
    colours = resolve_palette(palette)
    gen = torch.Generator().manual_seed(split_seed)
    if mnist_dir is None:
        splits = _digits_splits(gen, n_train, n_test, test_fraction, augmentation)
    else:
        splits = _mnist_splits(mnist_dir, gen, n_train, n_test)

    out: dict[str, torch.Tensor] = {"palette": colours.clone()}
    for split in ("train", "test"):
        gray, labels, source = splits[split]
        if split == "train":
            colour_index = labels.clone()  # the colour follows the label: a shortcut
        else:
            colour_index = torch.randint(0, 10, labels.shape, generator=gen)  # no label info
        colored, _ = colorize(gray, colour_index, gen, jitter_var, colours)
        out[f"{split}_gray"] = gray.contiguous()
        out[f"{split}_colored"] = colored.contiguous()
        out[f"{split}_labels"] = labels.contiguous()
        out[f"{split}_colour_index"] = colour_index
        out[f"{split}_source"] = source.contiguous()
    return out


def colour_label_agreement(
    colored: torch.Tensor,
    gray: torch.Tensor,
    labels: torch.Tensor,
    palette: str | torch.Tensor = DEFAULT_PALETTE,
) -> float:
    """Fraction of images whose nearest palette colour is their label's colour.

    Each image's colour is recovered exactly by least squares, colored = gray * colour, then
    snapped to the nearest palette entry. Near 1 when the colour follows the label and the
    palette's colours lie far apart for the jitter ("primary": 0.96), lower when the jitter
    blurs neighbours together ("pastel": about 0.7), about 0.1 (chance) when it is random.
    """
    colours = resolve_palette(palette)
    g = gray.flatten(1).unsqueeze(1)  # (N, 1, HW)
    colour = (colored.flatten(2) * g).sum(-1) / (g * g).sum(-1).clamp_min(1e-12)  # (N, 3)
    nearest = torch.cdist(colour, colours.to(colour)).argmin(dim=1)
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
        "scikit-learn's digits, grown",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and colour seed (default 0)")
    parser.add_argument(
        "--jitter-var",
        type=float,
        default=DEFAULT_JITTER_VAR,
        help=f"colour jitter variance (default {DEFAULT_JITTER_VAR})",
    )
    parser.add_argument(
        "--palette",
        choices=sorted(PALETTES),
        default=DEFAULT_PALETTE,
        help=f"the ten class colours (default {DEFAULT_PALETTE})",
    )
    parser.add_argument(
        "--n-train", type=int, help=f"training digits (default {DEFAULT_N_TRAIN:,} grown)"
    )
    parser.add_argument("--n-test", type=int, help=f"test digits (default {DEFAULT_N_TEST:,})")
    parser.add_argument("--preview", metavar="PNG", help="also save a grid of examples here")
    args = parser.parse_args(argv)
    try:
        data = build_colored_digits(
            args.seed,
            args.mnist,
            n_train=args.n_train,
            n_test=args.n_test,
            jitter_var=args.jitter_var,
            palette=args.palette,
        )
    except ValueError as exc:
        # One clear line, no traceback: this is a user error, not a bug.
        print(f"colored_digits: error: {exc}", file=sys.stderr)
        return 2
    for split in ("train", "test"):
        agree = colour_label_agreement(
            data[f"{split}_colored"],
            data[f"{split}_gray"],
            data[f"{split}_labels"],
            data["palette"],
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

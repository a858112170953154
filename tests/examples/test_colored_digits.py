"""The colored-digits data: the grown digits, the split, the colour shortcut, the MNIST reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from colored_digits import (
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    PALETTE,
    PALETTES,
    Augmentation,
    _affine_theta,
    _stroke,
    augment,
    build_colored_digits,
    colorize,
    colour_label_agreement,
    hue_palette,
    load_mnist_idx,
    read_idx,
    sklearn_digits_28,
)
from conftest import EXAMPLES, run_script

N_TRAIN, N_TEST = 600, 300


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    return build_colored_digits(split_seed=0, n_train=N_TRAIN, n_test=N_TEST)


def test_shapes_dtypes_and_range(digits):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        gray, colored = digits[f"{split}_gray"], digits[f"{split}_colored"]
        assert gray.shape == (n, 1, 28, 28) and gray.dtype == torch.float32
        assert colored.shape == (n, 3, 28, 28) and colored.dtype == torch.float32
        assert digits[f"{split}_labels"].dtype == torch.int64
        assert digits[f"{split}_colour_index"].shape == (n,)
        for x in (gray, colored):
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        # Transformed digits are bright somewhere, and colour never lights the black background.
        assert float(gray.amax(dim=(1, 2, 3)).min()) > 0.5
        assert torch.all((colored > 0) <= (gray > 0))
        # Every class is present in both splits (the split is stratified).
        assert torch.equal(digits[f"{split}_labels"].unique(), torch.arange(10))
    assert torch.equal(digits["palette"], PALETTE)


def test_default_sizes_and_the_originals():
    originals = build_colored_digits(split_seed=0, augmentation=None)
    n_train, n_test = len(originals["train_labels"]), len(originals["test_labels"])
    assert n_train + n_test == 1797  # every scikit-learn digit, once
    assert n_test == pytest.approx(0.25 * 1797, abs=10)
    gray_all, labels_all = sklearn_digits_28()
    for split in ("train", "test"):
        src = originals[f"{split}_source"]
        assert torch.equal(originals[f"{split}_gray"], gray_all[src])
        assert torch.equal(originals[f"{split}_labels"], labels_all[src])
    assert DEFAULT_N_TRAIN >= 10_000 and DEFAULT_N_TEST >= 1_000


def test_no_test_digit_is_a_transform_of_a_training_digit(digits):
    gray_all, labels_all = sklearn_digits_28()
    train_src, test_src = digits["train_source"], digits["test_source"]
    assert not set(train_src.tolist()) & set(test_src.tolist())
    # Labels are those of the originals, and the originals are used evenly (±1).
    for split, src in (("train", train_src), ("test", test_src)):
        assert torch.equal(digits[f"{split}_labels"], labels_all[src])
        counts = torch.bincount(src)[src.unique()]
        assert int(counts.max() - counts.min()) <= 1
    # The grown digits are transforms, not copies: none equals its original.
    diff = (digits["train_gray"] - gray_all[train_src]).abs().flatten(1).amax(1)
    assert float(diff.min()) > 0.05


def test_colour_follows_label_in_train_only(digits):
    assert torch.equal(digits["train_colour_index"], digits["train_labels"])
    train = colour_label_agreement(
        digits["train_colored"], digits["train_gray"], digits["train_labels"]
    )
    test = colour_label_agreement(
        digits["test_colored"], digits["test_gray"], digits["test_labels"]
    )
    # The default palette's neighbours lie close enough for the jitter (sigma^2 = 0.02) to blur
    # many colours into a neighbour's: a strong shortcut, not a perfect one.
    assert 0.55 < train < 0.85
    assert test < 0.2  # chance is 0.1
    # The test colours are spread over the whole palette, independently of the label.
    counts = torch.bincount(digits["test_colour_index"], minlength=10)
    assert int(counts.min()) > 0


def test_the_palettes():
    # The default: ten hues 36 degrees apart at saturation 0.6 and value 0.9, none dark.
    assert torch.equal(PALETTE, PALETTES["pastel"]) and torch.equal(PALETTE, hue_palette(0.6))
    assert PALETTE.shape == (10, 3) and float(PALETTE.amax(1).min()) == pytest.approx(0.9)
    assert float(PALETTE.amin(1).max()) == pytest.approx(0.36)
    for name, colours in PALETTES.items():
        distances = torch.cdist(colours, colours) + 10 * torch.eye(10)
        assert float(distances.min()) > 0.2, name  # ten distinct colours
        assert float(colours.sum(1).min()) > 0.5, name  # none black on the black background
    # The saturated palette of earlier versions is a near-perfect shortcut; the default is not.
    data = build_colored_digits(0, n_train=2000, n_test=10, palette="primary")
    primary = colour_label_agreement(
        data["train_colored"], data["train_gray"], data["train_labels"], data["palette"]
    )
    assert primary > 0.9 and torch.equal(data["palette"], PALETTES["primary"])
    with pytest.raises(ValueError, match="palette 'rainbow' is not one of"):
        build_colored_digits(0, n_train=10, n_test=10, palette="rainbow")


@pytest.mark.parametrize("jitter_var", [0.02, 0.03])
def test_colour_jitter_has_the_official_variance(jitter_var):
    # "primary" entry 9 is (0.5, 0.5, 0.5): its jitter is almost never clipped, so the colours'
    # variance per channel is the jitter variance itself (0.02 or 0.03, the official files').
    n = 20_000
    gray = torch.ones(n, 1, 2, 2)
    colored, colours = colorize(
        gray, torch.full((n,), 9), torch.Generator().manual_seed(0), jitter_var, "primary"
    )
    assert torch.equal(colored[:, :, 0, 0], colours)
    var = colours.double().var(dim=0)
    expected = torch.full((3,), jitter_var, dtype=torch.float64)
    torch.testing.assert_close(var, expected, rtol=0.05, atol=0)
    torch.testing.assert_close(
        colours.double().mean(0), torch.full((3,), 0.5, dtype=torch.float64), rtol=0, atol=0.01
    )


def test_identity_augmentation_leaves_digits_unchanged():
    gray_all, _ = sklearn_digits_28()
    none = Augmentation(
        rotate_deg=0.0, scale=(1.0, 1.0), shear=0.0, shift_px=0.0, elastic_px=0.0, stroke=0.0
    )
    out = augment(gray_all[:50], torch.Generator().manual_seed(0), none)
    torch.testing.assert_close(out, gray_all[:50], rtol=0, atol=1e-6)


def test_shift_moves_by_whole_pixels():
    # A shift of exactly 2 pixels (scale, rotation and shear fixed at identity) lands every
    # sample on a pixel centre: the result is the digit rolled by 2, zeros coming in.
    gray_all, _ = sklearn_digits_28()
    x = gray_all[:20]
    only_shift = Augmentation(
        rotate_deg=0.0, scale=(1.0, 1.0), shear=0.0, shift_px=2.0, elastic_px=0.0, stroke=0.0
    )
    theta = _affine_theta(20, only_shift, torch.Generator().manual_seed(1))
    torch.testing.assert_close(theta[:, :, :2], torch.eye(2).expand(20, 2, 2))
    # Force the shifts to +2 pixels in x and -2 in y by hand.
    theta[:, 0, 2], theta[:, 1, 2] = -2 * 2 / 28, 2 * 2 / 28
    grid = F.affine_grid(theta, [20, 1, 28, 28], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    expected = torch.zeros_like(x)
    expected[:, :, :-2, 2:] = x[:, :, 2:, :-2]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_affine_matrix_matches_hand_formula():
    aug = Augmentation(rotate_deg=30.0, scale=(0.5, 2.0), shear=0.4, shift_px=3.0)
    theta = _affine_theta(8, aug, torch.Generator().manual_seed(2)).double()
    # Replay the same draws by hand: angle, scale, shear, shift in that order.
    gen = torch.Generator().manual_seed(2)
    u = [torch.rand(k, generator=gen, dtype=torch.float64) for k in (8, 8, 8, 16)]
    angle = torch.deg2rad(-30 + 60 * u[0])
    scale, shear = 0.5 + 1.5 * u[1], -0.4 + 0.8 * u[2]
    shift = (-3 + 6 * u[3]).view(8, 2) * 2 / 28
    for i in range(8):
        c, s = float(torch.cos(angle[i])), float(torch.sin(angle[i]))
        forward = (
            torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
            @ torch.tensor([[1.0, float(shear[i])], [0.0, 1.0]], dtype=torch.float64)
            * float(scale[i])
        )
        # theta maps output points to input points: p_in = A⁻¹ (p_out − shift).
        torch.testing.assert_close(theta[i, :, :2], torch.linalg.inv(forward), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            theta[i, :, 2], -torch.linalg.inv(forward) @ shift[i], atol=1e-6, rtol=0
        )


def test_stroke_width_changes_the_ink():
    gray_all, _ = sklearn_digits_28()
    x = gray_all[:30]
    ink = x.sum(dim=(1, 2, 3))
    thick = _stroke(x, torch.ones(30)).sum(dim=(1, 2, 3))
    thin = _stroke(x, -torch.ones(30)).sum(dim=(1, 2, 3))
    assert torch.all(thick > 1.2 * ink) and torch.all(thin < 0.8 * ink)
    assert torch.equal(_stroke(x, torch.zeros(30)), x)
    # A full weight is exactly the 3x3 max-pool (dilation).
    torch.testing.assert_close(_stroke(x, torch.ones(30)), F.max_pool2d(x, 3, 1, 1))


def test_older_size_names():
    old = build_colored_digits(3, max_train=40, max_test=30)
    new = build_colored_digits(3, n_train=40, n_test=30)
    assert old["train_gray"].shape == (40, 1, 28, 28) and old["test_gray"].shape == (30, 1, 28, 28)
    for key in new:
        assert torch.equal(old[key], new[key]), key


def test_deterministic_and_seeded(digits):
    again = build_colored_digits(split_seed=0, n_train=N_TRAIN, n_test=N_TEST)
    assert digits.keys() == again.keys()
    for key in digits:
        assert torch.equal(digits[key], again[key]), key
    other = build_colored_digits(split_seed=1, n_train=N_TRAIN, n_test=N_TEST)
    assert not torch.equal(digits["test_labels"], other["test_labels"])
    assert not torch.equal(digits["train_gray"], other["train_gray"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"n_train": 0}, "n_train must be a positive integer"),
        ({"n_test": 2.5}, "n_test must be a positive integer"),
        ({"n_train": 50, "max_train": 40}, "max_train=40 is the older name of n_train=50"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_colored_digits(0, **kwargs)


# --------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (the MNIST format), gzip-compressed for *.gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, n_train: int = 30, n_test: int = 20) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    # Mix the spellings in circulation: gzip and raw, '-' and '.' before "idx".
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    _write_idx(root / "t10k-images.idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))
    return root


def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        _write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)


def test_reads_a_fake_mnist(tmp_path):
    root = _fake_mnist(tmp_path / "mnist")
    raw = load_mnist_idx(root)
    assert raw["train_images"].shape == (30, 28, 28)
    assert raw["test_labels"].shape == (20,)
    data = build_colored_digits(split_seed=0, mnist_dir=root)
    assert data["train_gray"].shape == (30, 1, 28, 28)
    assert data["test_colored"].shape == (20, 3, 28, 28)
    assert torch.equal(data["train_labels"], torch.arange(30) % 10)
    assert torch.allclose(
        data["train_gray"][:, 0] * 255, torch.as_tensor(raw["train_images"]).float()
    )
    assert torch.equal(data["train_colour_index"], data["train_labels"])
    capped = build_colored_digits(split_seed=0, mnist_dir=root, n_train=12, n_test=5)
    assert capped["train_gray"].shape == (12, 1, 28, 28) and len(capped["test_labels"]) == 5
    assert torch.equal(capped["train_labels"], capped["train_source"] % 10)


@pytest.mark.parametrize("problem", ["missing", "empty", "truncated", "not_idx"])
def test_bad_mnist_dir_raises_valueerror(tmp_path, problem):
    root = tmp_path / "mnist"
    if problem != "missing":
        root.mkdir()
    if problem in ("truncated", "not_idx"):
        _fake_mnist(root)
        target = root / "train-labels-idx1-ubyte"
        data = target.read_bytes()
        target.write_bytes(data[:-3] if problem == "truncated" else b"hello world")
    with pytest.raises(ValueError, match=str(root)):
        build_colored_digits(0, mnist_dir=root)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["colored_digits.py", "pmr_colored_digits.py"])
@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_cli_mnist_error_is_one_line(tmp_path, script, problem):
    root = tmp_path / "nowhere"
    if problem == "malformed":
        _fake_mnist(root)
        (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage, not gzip")
    proc = run_script(str(EXAMPLES / script), "--mnist", str(root), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error" in lines[0] and str(root) in lines[0]
    assert proc.stdout == ""


@pytest.mark.slow
def test_cli_summary_and_preview(tmp_path):
    proc = run_script(
        str(EXAMPLES / "colored_digits.py"),
        *("--n-train", "200", "--n-test", "100", "--preview", str(tmp_path / "p.png")),
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: gray (200, 1, 28, 28)" in proc.stdout and "test : gray (100," in proc.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000

"""The colored-digits data: shapes, the colour shortcut, determinism, and the MNIST reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from colored_digits import (
    PALETTE,
    build_colored_digits,
    colour_label_agreement,
    load_mnist_idx,
    read_idx,
)
from conftest import EXAMPLES, run_script


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    return build_colored_digits(split_seed=0)


def test_shapes_dtypes_and_range(digits):
    n_train, n_test = len(digits["train_labels"]), len(digits["test_labels"])
    assert n_train + n_test == 1797  # every sklearn digit, once
    assert n_test == pytest.approx(0.25 * 1797, abs=10)
    for split, n in (("train", n_train), ("test", n_test)):
        gray, colored = digits[f"{split}_gray"], digits[f"{split}_colored"]
        assert gray.shape == (n, 1, 28, 28) and gray.dtype == torch.float32
        assert colored.shape == (n, 3, 28, 28) and colored.dtype == torch.float32
        assert digits[f"{split}_labels"].dtype == torch.int64
        assert digits[f"{split}_colour_index"].shape == (n,)
        for x in (gray, colored):
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        # Upsampled digits are bright somewhere, and colour never lights the black background.
        assert float(gray.amax(dim=(1, 2, 3)).min()) > 0.5
        assert torch.all((colored > 0) <= (gray > 0))
        # Every class is present in both splits (the split is stratified).
        assert torch.equal(digits[f"{split}_labels"].unique(), torch.arange(10))
    assert torch.equal(digits["palette"], PALETTE)


def test_colour_follows_label_in_train_only(digits):
    assert torch.equal(digits["train_colour_index"], digits["train_labels"])
    train = colour_label_agreement(
        digits["train_colored"], digits["train_gray"], digits["train_labels"]
    )
    test = colour_label_agreement(
        digits["test_colored"], digits["test_gray"], digits["test_labels"]
    )
    assert train > 0.9  # jitter (sigma^2 = 0.02) blurs a few colours into a neighbour's
    assert test < 0.2  # chance is 0.1
    # The test colours are spread over the whole palette, independently of the label.
    counts = torch.bincount(digits["test_colour_index"], minlength=10)
    assert int(counts.min()) > 0


def test_deterministic_and_seeded(digits):
    again = build_colored_digits(split_seed=0)
    assert digits.keys() == again.keys()
    for key in digits:
        assert torch.equal(digits[key], again[key]), key
    other = build_colored_digits(split_seed=1)
    assert not torch.equal(digits["test_labels"], other["test_labels"])


def test_caps_and_bad_fraction():
    small = build_colored_digits(3, max_train=40, max_test=30)
    assert small["train_gray"].shape == (40, 1, 28, 28)
    assert small["test_colored"].shape == (30, 3, 28, 28)
    with pytest.raises(ValueError, match="test_fraction"):
        build_colored_digits(0, test_fraction=1.5)


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


def test_cli_summary_and_preview(tmp_path):
    proc = run_script(str(EXAMPLES / "colored_digits.py"), "--preview", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "test" in proc.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000

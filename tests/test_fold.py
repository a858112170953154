"""regbn.fold: RegBN calls as plain torch ops; and the meta-device workflow with the resets."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import regbn
from regbn import RegBN

OFFICIAL = dict(normalize_input=True, normalize_output=True, affine=True, sigma_THR=0.0,
                sigma_MIN=1e-8)


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(2 * 4 * 4 + 4, 3)

    def forward(self, image, vector):
        f = torch.relu(self.conv(image))
        g = self.fc(vector)
        return self.head(torch.cat([f.flatten(1), g], 1))


def inputs(B: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, 4, 4, generator=gen, dtype=dtype),
            torch.randn(B, 5, generator=gen, dtype=dtype))


def trained(dtype=torch.float32, steps: int = 3) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    patched = regbn.insert(TwoBranch().to(dtype), pairs=[("conv", "fc")],
                           example_inputs=inputs(8, dtype=dtype), **OFFICIAL)
    for step in range(steps):
        out = patched(*inputs(8, seed=10 + step, dtype=dtype))
        out.square().sum().backward()  # gives the affine norms gradients, as training would
    return patched


def test_fold_equals_the_eval_model_and_leaves_the_caller_alone():
    patched = trained(torch.float64)
    state = {k: v.clone() for k, v in patched.state_dict().items()}
    folded = regbn.fold(patched)
    assert patched.training and isinstance(patched.regbn_0, RegBN)  # the caller's model
    for k, v in patched.state_dict().items():
        assert torch.equal(v, state[k]) or (v.isnan() == state[k].isnan()).all(), k
    assert not folded.training
    assert not any(isinstance(m, RegBN) for m in folded.modules())
    assert "regbn" not in folded.code.replace("regbn_0", "")
    assert torch.equal(folded.regbn_0.W, patched.regbn_0.W)
    assert folded.regbn_0.W.data_ptr() != patched.regbn_0.W.data_ptr()
    patched.eval()
    for B in (1, 5):
        x = inputs(B, seed=B, dtype=torch.float64)
        torch.testing.assert_close(folded(*x), patched(*x), rtol=1e-12, atol=1e-12)


def test_folded_model_loads_runs_and_exports_without_regbn(tmp_path):
    folded = regbn.fold(trained())
    x = inputs(5, seed=5)
    torch.save({"model": folded, "x": x, "want": folded(*x).detach()}, tmp_path / "folded.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["regbn"] = None  # any import of regbn now fails
        import torch
        saved = torch.load({str(tmp_path / "folded.pt")!r}, weights_only=False)
        model, x, want = saved["model"], saved["x"], saved["want"]
        torch.testing.assert_close(model(*x), want, rtol=1e-6, atol=1e-6)
        B = torch.export.Dim("B", min=1, max=64)
        ep = torch.export.export(model, x, dynamic_shapes=({{0: B}}, {{0: B}}))
        torch.export.save(ep, {str(tmp_path / "folded.pt2")!r})
        loaded = torch.export.load({str(tmp_path / "folded.pt2")!r}).module()
        torch.testing.assert_close(loaded(*x), want, rtol=1e-6, atol=1e-6)
        assert loaded(x[0][:2], x[1][:2]).shape == (2, 3)
        assert "regbn" not in sys.modules or sys.modules["regbn"] is None
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_of_a_half_layer_computes_in_float32(dtype):
    layer = RegBN(6, 4, [], [], **OFFICIAL).to(dtype)
    gen = torch.Generator().manual_seed(0)
    layer(torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 4, generator=gen).to(dtype))
    layer.eval()
    folded = regbn.fold(layer)
    assert folded.regbn.W.dtype == torch.float32
    f, g = torch.randn(3, 6, generator=gen).to(dtype), torch.randn(3, 4, generator=gen).to(dtype)
    for got, want in zip(folded(f, g), layer(f, g), strict=True):
        assert got.dtype == dtype
        # exact: fold writes the layer's own eval_maths ops (same kernels, order and tensors)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_fold_traces_a_hand_written_model():
    class Hand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 6)
            self.rb = RegBN(6, 3, [], [])

        def forward(self, x, y):
            f_r, g_out = self.rb(self.fc(x), y)
            return f_r.sum(1) + g_out.sum(1)

    model = Hand()
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    model(x, y)
    folded = regbn.fold(model)
    model.eval()
    # exact: fold writes the layer's own eval_maths ops (same kernels, order and tensors)
    torch.testing.assert_close(folded(x[:3], y[:3]), model(x[:3], y[:3]), rtol=0, atol=0)
    assert not any(isinstance(m, RegBN) for m in folded.modules())


def test_fold_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="lazy and has seen no batch"):
        regbn.fold(RegBN())

    class Forced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rb = RegBN(4, 3, [], [])

        def forward(self, f, g):
            return self.rb(f, g, is_training=True)[0]

    with pytest.raises(ValueError, match="passes is_training=True"):
        regbn.fold(Forced())


def test_meta_device_build_then_reset_matches_a_cpu_build():
    """Build on meta, insert by shapes, to_empty, load the original checkpoint, reset RegBN."""
    torch.manual_seed(1)
    checkpoint = TwoBranch().state_dict()
    shapes = [(8, 1, 4, 4), (8, 5)]
    with torch.device("meta"):
        meta_model = TwoBranch()
    patched = regbn.insert(meta_model, pairs=[("conv", "fc")], input_shapes=shapes, **OFFICIAL)
    assert patched.regbn_0.W.device.type == "meta"
    patched = patched.to_empty(device="cpu")
    missing = patched.load_state_dict(checkpoint, strict=False).missing_keys
    assert missing and all(k.startswith("regbn_0.") for k in missing)
    for module in patched.modules():
        if isinstance(module, RegBN):
            module.reset_parameters()
    cpu_model = TwoBranch()
    cpu_model.load_state_dict(checkpoint)
    reference = regbn.insert(cpu_model, pairs=[("conv", "fc")], input_shapes=shapes, **OFFICIAL)
    for k, v in reference.state_dict().items():
        got = patched.state_dict()[k]
        assert torch.equal(got, v) or (got.isnan() == v.isnan()).all() and torch.equal(
            got.nan_to_num(), v.nan_to_num()), k
    # exact: the two models are the same graph with equal state, run on the same inputs
    for step in range(2):
        x = inputs(8, seed=step)
        torch.testing.assert_close(patched(*x), reference(*x), rtol=0, atol=0)
    patched.eval()
    reference.eval()
    x = inputs(3, seed=9)
    torch.testing.assert_close(patched(*x), reference(*x), rtol=0, atol=0)


def test_fold_of_a_layer_called_twice():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rb = RegBN(4, 3, [], [])

        def forward(self, f, g):
            a, _ = self.rb(f, g)
            b, g_out = self.rb(2 * f, g)
            return a + b + g_out.sum(1, keepdim=True)

    model = Shared()
    f, g = torch.randn(8, 4), torch.randn(8, 3)
    model(f, g)
    folded = regbn.fold(model)
    model.eval()
    # exact: fold writes the layer's own eval_maths ops (same kernels, order and tensors)
    torch.testing.assert_close(folded(f, g), model(f, g), rtol=0, atol=0)


class ModeDependent(TwoBranch):
    """Code that reads self.training: the patched model holds one graph per mode."""

    def forward(self, image, vector):
        out = super().forward(image, vector)
        return out + 100.0 if self.training else out


def test_fold_takes_the_eval_graph_of_a_model_in_training_mode():
    torch.manual_seed(0)
    patched = regbn.insert(ModeDependent(), pairs=[("conv", "fc")], example_inputs=inputs(8),
                           **OFFICIAL)
    patched.train()
    patched(*inputs(8, seed=1))
    folded = regbn.fold(patched)
    assert patched.training
    x = inputs(5, seed=2)
    patched.eval()
    # exact: fold writes the layer's own eval_maths ops (same kernels, order and tensors)
    torch.testing.assert_close(folded(*x), patched(*x), rtol=0, atol=0)
    plain = ModeDependent().train()  # no RegBN: the fold is the fx trace of the same ops
    torch.testing.assert_close(regbn.fold(plain)(*x), plain.eval()(*x), rtol=0, atol=0)


def test_fold_and_export_a_channel_projection():
    torch.manual_seed(0)

    class Maps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
            self.head = nn.Linear(6 * 8 * 8, 3)

        def forward(self, x, y):
            return self.head(torch.cat([self.a(x), self.b(y)], 1).flatten(1))

    x = (torch.randn(16, 1, 8, 8), torch.randn(16, 3, 8, 8))
    # the full W (256×128 floats) passes the limit, the channel W (2×4) does not: auto keeps it
    patched = regbn.insert(
        Maps(), "auto", x, projection="channel", max_projection_bytes=1000, normalize_input=True,
        affine=True,
    )
    assert patched.regbn_0.W.shape == (2, 4)
    for _ in range(3):
        patched(torch.randn(16, 1, 8, 8), torch.randn(16, 3, 8, 8))
    patched.eval()
    folded = regbn.fold(patched)
    x5 = (torch.randn(5, 1, 8, 8), torch.randn(5, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(folded(*x5), patched(*x5), atol=1e-6, rtol=0)
        batch = torch.export.Dim("batch")
        exported = torch.export.export(folded, x5, dynamic_shapes=({0: batch}, {0: batch}))
        x9 = (torch.randn(9, 1, 8, 8), torch.randn(9, 3, 8, 8))
        torch.testing.assert_close(exported.module()(*x9), patched(*x9), atol=1e-6, rtol=0)

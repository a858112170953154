"""Black-box contract tests: only ``import regbn`` and its documented public API.

Written as an external grader would, from the design alone. Every expected value comes from an
independent float64 formula below, never from the library's own helpers.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import regbn

OFFICIAL = {'gpu': 0, 'f_num_channels': 128, 'g_num_channels': 16, 'f_layer_dim': [],
            'g_layer_dim': [], 'normalize_input': True, 'normalize_output': True,
            'affine': False}


# ----------------------------------------------------------------------------- reference maths
def _spectrum(G):
    U, S, _ = torch.linalg.svd(G, full_matrices=False)
    keep = S > S.max() * 1e-12
    return U[:, keep], S[keep]


def _bisect(fun, hi, iters=300):
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fun(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ref_lambda(F, G, rule="paper"):
    F, G = F.double(), G.double()
    U, S = _spectrum(G)
    s2 = S**2
    if rule == "paper":
        c2 = (U.T @ F).pow(2).sum(1)
        phi = lambda lam: float((s2 * c2 / (s2 + lam) ** 2).sum())  # noqa: E731
        if phi(0.0) <= 1.0:
            return 0.0
        return _bisect(phi, math.sqrt(float((s2 * c2).sum())) + 1.0)
    psi = lambda lam: float(((s2 / (s2 + lam)) ** 2).sum())  # noqa: E731
    if psi(0.0) <= 1.0:
        return 0.0
    return _bisect(psi, math.sqrt(len(S)) * float(s2.max()) + 1.0)


def ref_W(F, G, lam):
    F, G = F.double(), G.double()
    if lam == 0.0:
        return torch.linalg.pinv(G) @ F
    B = G.shape[0]
    return G.T @ torch.linalg.solve(G @ G.T + lam * torch.eye(B, dtype=G.dtype), F)


def ref_running(W, Wb, m, v, t, beta1=0.9, beta2=0.99, momentum=0.02):
    d = (W - Wb).abs().mean()
    m = beta1 * m + (1 - beta1) * d
    v = beta2 * v + (1 - beta2) * d * d
    eta = momentum * (m / (1 - beta1**t)) / (torch.sqrt(v / (1 - beta2**t)) + 1e-8)
    return (1 - eta) * W + eta * Wb, m, v


def plain(f_c, g_c, f_dim=(), g_dim=(), **kw):
    """A layer with no normalisation, in float64: its output is the bare projection."""
    kw = {"normalize_input": False, "normalize_output": False, **kw}
    return regbn.RegBN(f_c, g_c, list(f_dim), list(g_dim), **kw).double()


def buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def same_buffers(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (
            a[k].is_floating_point() and torch.equal(a[k].isnan(), b[k].isnan())
            and torch.equal(a[k].nan_to_num(), b[k].nan_to_num())), k


torch.manual_seed(0)


# ----------------------------------------------------------------------------- §2 signature
def test_official_kwargs_gpu_warns_and_forward_keywords():
    with pytest.warns(UserWarning):
        layer = regbn.RegBN(**OFFICIAL)
    f, g = torch.randn(8, 128), torch.randn(8, 16)
    f_r, g_out = layer(f, g, is_training=True, n_epoch=1)
    assert f_r.shape == f.shape and g_out.shape == g.shape
    f_r, g_out = layer(f, g, True, 3, 100)  # the official forward's positional order
    assert torch.isfinite(f_r).all() and torch.isfinite(g_out).all()
    assert layer.last_lambda is not None


def test_positional_signature_and_defaults():
    import inspect as pyinspect
    sig = pyinspect.signature(regbn.RegBN)
    names = ["f_num_channels", "g_num_channels", "f_layer_dim", "g_layer_dim", "gpu", "beta1",
             "beta2", "momentum", "normalize_input", "normalize_output", "affine", "sigma_THR",
             "sigma_MIN", "verbose"]
    assert list(sig.parameters)[:len(names)] == names
    defaults = dict(f_num_channels=None, g_num_channels=None, f_layer_dim=None, g_layer_dim=None,
                    gpu=None, beta1=0.9, beta2=0.99, momentum=0.02, normalize_input=False,
                    normalize_output=True, affine=False, sigma_THR=0.0, sigma_MIN=0.0,
                    verbose=False)
    for k, v in defaults.items():
        assert sig.parameters[k].default == v, k
    assert sig.parameters["lambda_rule"].kind is pyinspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["lambda_rule"].default == "paper"
    assert sig.parameters["max_projection_bytes"].default == 2**30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regbn.RegBN(4, 3, [], [])  # no gpu: no warning


# ----------------------------------------------------------------------------- §1 maths
def test_paper_rule_unit_norm_and_batch_output():
    torch.manual_seed(1)
    F, G = 3 * torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    assert torch.linalg.norm(torch.linalg.pinv(G) @ F) > 1
    layer = plain(12, 16)
    f_r, g_out = layer(F, G, is_training=True)
    lam = ref_lambda(F, G)
    assert lam > 0
    assert layer.last_lambda == pytest.approx(lam, rel=1e-8)
    W = ref_W(F, G, lam)
    assert float(torch.linalg.norm(W)) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(f_r, F - G @ W, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_out, G)


def test_paper_rule_lambda_zero_inside_unit_ball():
    torch.manual_seed(2)
    F, G = 0.01 * torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    assert torch.linalg.norm(torch.linalg.pinv(G) @ F) <= 1
    layer = plain(3, 4)
    f_r, _ = layer(F, G, is_training=True)
    assert layer.last_lambda == 0.0
    torch.testing.assert_close(f_r, F - G @ (torch.linalg.pinv(G) @ F), rtol=1e-8, atol=1e-12)


def test_official_rule_spectrum_only():
    torch.manual_seed(3)
    F, G = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)
    layer = plain(6, 7, lambda_rule="official")
    f_r, _ = layer(F, G, is_training=True)
    lam = ref_lambda(F, G, "official")
    assert layer.last_lambda == pytest.approx(lam, rel=1e-8)
    _, S = _spectrum(G)
    assert float(((S**2 / (S**2 + lam)) ** 2).sum()) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(f_r, F - G @ ref_W(F, G, lam), rtol=1e-8, atol=1e-10)
    layer2 = plain(6, 7, lambda_rule="official")
    layer2(100 * F, G, is_training=True)  # depends on g's spectrum alone
    assert layer2.last_lambda == pytest.approx(lam, rel=1e-8)


def test_f_r_equals_lambda_resolvent_form():
    torch.manual_seed(4)
    F, G = 5 * torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    layer = plain(4, 9)
    f_r, _ = layer(F, G, is_training=True)
    lam = layer.last_lambda
    K = G @ G.T
    torch.testing.assert_close(f_r, lam * torch.linalg.solve(K + lam * torch.eye(6,
                               dtype=torch.float64), F), rtol=1e-8, atol=1e-10)


def test_running_update_eq6_t_from_one():
    torch.manual_seed(5)
    layer = plain(5, 3, momentum=0.3)
    W = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(layer.W, W)  # initially zeros
    m = v = torch.zeros((), dtype=torch.float64)
    for t in range(1, 4):
        F, G = 4 * torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
        layer(F, G, is_training=True)
        Wb = ref_W(F, G, ref_lambda(F, G))
        W, m, v = ref_running(W, Wb, m, v, t, momentum=0.3)
        assert tuple(layer.W.shape) == (3, 5)
        torch.testing.assert_close(layer.W, W, rtol=1e-7, atol=1e-10)
    counters = [v for v in layer.state_dict().values()
                if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.numel() == 1]
    assert any(int(c) == 3 for c in counters)  # the batch counter


def test_eval_uses_running_W_changes_nothing_batch_of_one():
    torch.manual_seed(6)
    layer = plain(5, 3)
    for _ in range(2):
        layer(torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64))
    layer.eval()
    before = buffers(layer)
    F, G = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    f_r, g_out = layer(F, G)
    torch.testing.assert_close(f_r, F - G @ layer.W, rtol=1e-10, atol=1e-12)
    f1, _ = layer(F[:1], G[:1])
    torch.testing.assert_close(f1, f_r[:1])
    same_buffers(before, buffers(layer))


def test_is_training_overrides_mode():
    torch.manual_seed(7)
    layer = plain(5, 3)
    layer.train()
    before = buffers(layer)
    F, G = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    f_r, _ = layer(F, G, is_training=False)  # eval path with W = 0: f_r = F
    torch.testing.assert_close(f_r, F)
    same_buffers(before, buffers(layer))
    layer.eval()
    layer(F, G, is_training=True)
    assert layer.last_lambda is not None
    assert not torch.equal(layer.W, torch.zeros_like(layer.W))


# ----------------------------------------------------------------------------- normalisations
def test_input_norm_kind():
    for spatial, kind in [((4, 5), nn.BatchNorm2d), ((2, 3, 2), nn.BatchNorm3d),
                          ((6,), nn.LayerNorm), ((), nn.LayerNorm)]:
        layer = regbn.RegBN(3, 2, list(spatial), [], normalize_input=True)
        assert any(type(m) is kind for m in layer.modules()), spatial


def test_input_and_output_normalisation_maths():
    torch.manual_seed(8)
    f = torch.randn(6, 2, 3, 3, dtype=torch.float64) * 3 + 1
    g = torch.randn(6, 4, dtype=torch.float64) * 2 - 1
    layer = regbn.RegBN(2, 4, [3, 3], [], normalize_input=True, normalize_output=False).double()
    f_r, g_out = layer(f, g, is_training=True)
    fn = TF.batch_norm(f, None, None, training=True, eps=1e-5)
    gn = TF.layer_norm(g, (4,), eps=1e-5)
    Fn, Gn = fn.reshape(6, -1), gn.reshape(6, -1)
    lam = ref_lambda(Fn, Gn)
    torch.testing.assert_close(f_r.reshape(6, -1), Fn - Gn @ ref_W(Fn, Gn, lam),
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_out, gn, rtol=1e-8, atol=1e-10)
    # output LayerNorm over [C, *spatial]
    layer2 = regbn.RegBN(2, 4, [3, 3], [], normalize_output=True).double()
    f_r2, g_out2 = layer2(f, g, is_training=True)
    torch.testing.assert_close(g_out2, TF.layer_norm(g, (4,)), rtol=1e-8, atol=1e-10)
    ref_fr = TF.layer_norm(f_r2, (2, 3, 3))  # idempotent up to eps: already normalised
    torch.testing.assert_close(f_r2, ref_fr, rtol=1e-4, atol=1e-4)
    assert f_r2.reshape(6, -1).mean(1).abs().max() < 1e-8


def test_affine_switch():
    assert len(list(regbn.RegBN(3, 2, [4, 4], [], normalize_input=True).parameters())) == 0
    n = len(list(regbn.RegBN(3, 2, [4, 4], [], normalize_input=True, affine=True).parameters()))
    assert n >= 4


# ----------------------------------------------------------------------------- lazy, state, dtype
def test_lazy_shapes_from_first_batch():
    layer = regbn.RegBN()
    f, g = torch.randn(5, 3, 2), torch.randn(5, 4, 2, 2)
    f_r, g_out = layer(f, g)
    assert f_r.shape == f.shape and g_out.shape == g.shape
    assert tuple(layer.W.shape) == (16, 6)
    with pytest.raises(ValueError, match=r"\(5, 3, 3\)|3, 3"):
        layer(torch.randn(5, 3, 3), g)


def test_state_dict_buffers_and_bit_exact_reload():
    torch.manual_seed(9)
    layer = regbn.RegBN(4, 3, [], [2], normalize_input=True)
    for _ in range(3):
        layer(torch.randn(6, 4), torch.randn(6, 3, 2))
    sd = layer.state_dict()
    assert "W" in sd and tuple(sd["W"].shape) == (6, 4)
    assert sum(1 for k, v in sd.items() if isinstance(v, torch.Tensor)) >= 5  # W, m, v, t, λ hist
    assert any(isinstance(v, torch.Tensor) and v.numel() > 1 and
               torch.isclose(v.double(), torch.tensor(layer.last_lambda, dtype=torch.float64)
                             ).any() for k, v in sd.items() if k != "W")
    layer.eval()
    x = (torch.randn(3, 4), torch.randn(3, 3, 2))
    ref = layer(*x)
    for fresh in (regbn.RegBN(4, 3, [], [2], normalize_input=True), regbn.RegBN(
            normalize_input=True)):
        fresh.load_state_dict(sd)
        fresh.eval()
        out = fresh(*x)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert fresh.last_lambda == layer.last_lambda


def test_dtypes():
    for dtype in (torch.float32, torch.float64):
        _check_dtype(dtype)


def _check_dtype(dtype):
    layer = regbn.RegBN(4, 3, [], []).to(dtype)
    f_r, g_out = layer(torch.randn(6, 4, dtype=dtype), torch.randn(6, 3, dtype=dtype))
    assert f_r.dtype == dtype and g_out.dtype == dtype
    lazy = regbn.RegBN()
    f_r, _ = lazy(torch.randn(6, 4, dtype=dtype), torch.randn(6, 3, dtype=dtype))
    assert f_r.dtype == dtype
    lazy.eval()
    assert lazy(torch.randn(1, 4, dtype=dtype), torch.randn(1, 3, dtype=dtype))[0].dtype == dtype


def test_autocast_solves_in_float32():
    torch.manual_seed(10)
    f, g = 3 * torch.randn(8, 6), torch.randn(8, 5)
    a, b = regbn.RegBN(6, 5, [], []), regbn.RegBN(6, 5, [], [])
    ref, _ = a(f, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = b(f, g)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    assert b.last_lambda == pytest.approx(a.last_lambda, rel=1e-4)
    assert b.W.dtype == torch.float32
    c = regbn.RegBN()  # bf16 activations, as autocast produces them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = c(f.bfloat16(), g.bfloat16())
    assert torch.isfinite(out).all() and c.W.dtype == torch.float32


def test_gradcheck_exact_gradients():
    torch.manual_seed(11)
    layer = plain(3, 5)
    F = (4 * torch.randn(4, 3, dtype=torch.float64)).requires_grad_()
    G = torch.randn(4, 5, dtype=torch.float64).requires_grad_()
    layer(F, G, is_training=True)
    assert layer.last_lambda > 0
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, is_training=True)[0], (F, G),
                                    eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- §2 bad input
@pytest.mark.parametrize("case", ["batch", "shape", "one", "bytes"])
def test_bad_input_value_error_changes_nothing(case):
    layer = regbn.RegBN(4, 3, [], [2], normalize_input=True)
    layer(torch.randn(5, 4), torch.randn(5, 3, 2))
    before = buffers(layer)
    if case == "batch":
        with pytest.raises(ValueError, match=r"(?i)batch") as e:
            layer(torch.randn(5, 4), torch.randn(6, 3, 2))
        assert "5" in str(e.value) and "6" in str(e.value)
    elif case == "shape":
        with pytest.raises(ValueError, match=r"(?i)shape") as e:
            layer(torch.randn(5, 4), torch.randn(5, 3, 7))
        assert "7" in str(e.value) and "2" in str(e.value)
    elif case == "one":
        with pytest.raises(ValueError, match=r"1"):
            layer(torch.randn(1, 4), torch.randn(1, 3, 2), is_training=True)
    else:
        with pytest.raises(ValueError, match=r"(?i)pool") as e:
            small = regbn.RegBN(max_projection_bytes=1000)
            small(torch.randn(5, 100), torch.randn(5, 10))
        assert "100" in str(e.value) and "10" in str(e.value)
        with pytest.raises(ValueError, match=r"(?i)pool"):
            regbn.RegBN(100, 10, [], [], max_projection_bytes=1000)(
                torch.randn(5, 100), torch.randn(5, 10))
    same_buffers(before, buffers(layer))


def test_nonfinite_training_input_raises_no_buffer_change():
    for bad in (math.nan, math.inf, -math.inf):
        _check_nonfinite(bad)


def _check_nonfinite(bad):
    torch.manual_seed(12)
    layer = regbn.RegBN(4, 3, [2, 2], [], normalize_input=True)
    layer(torch.randn(5, 4, 2, 2), torch.randn(5, 3))
    before = buffers(layer)
    f = torch.randn(5, 4, 2, 2)
    f[2, 1, 0, 1] = bad
    with pytest.raises(ValueError):
        layer(f, torch.randn(5, 3))
    g = torch.randn(5, 3)
    g[0, 0] = bad
    with pytest.raises(ValueError):
        layer(torch.randn(5, 4, 2, 2), g)
    same_buffers(before, buffers(layer))
    f_r, _ = layer(torch.randn(5, 4, 2, 2), torch.randn(5, 3))  # still healthy
    assert torch.isfinite(f_r).all()


def _ddp_worker(rank, world, tmp):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    f, g, wf, wg = torch.load(f"{tmp}/data.pt")
    rows = [slice(0, 2), slice(2, 5)][rank]  # uneven local batches
    layer = regbn.convert_sync_regbn(regbn.RegBN(4, 3, [], [2], normalize_input=True)).double()
    fl, gl = f[rows].clone().requires_grad_(), g[rows].clone().requires_grad_()
    f_r, g_out = layer(fl, gl)
    ((f_r * wf[rows]).sum() + (g_out * wg[rows]).sum()).backward()
    torch.save((f_r.detach(), g_out.detach(), fl.grad, gl.grad, layer.W.clone(),
                layer.last_lambda), f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_convert_sync_regbn_gloo_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(23)
    f, g = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    wf, wg = torch.randn_like(f), torch.randn_like(g)
    torch.save((f, g, wf, wg), tmp_path / "data.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    layer = regbn.RegBN(4, 3, [], [2], normalize_input=True).double()
    F, G = f.clone().requires_grad_(), g.clone().requires_grad_()
    f_r, g_out = layer(F, G)
    ((f_r * wf).sum() + (g_out * wg).sum()).backward()
    for rank, rows in enumerate([slice(0, 2), slice(2, 5)]):
        rf, rg, gf, gg, W, lam = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(rf, f_r[rows].detach())
        torch.testing.assert_close(rg, g_out[rows].detach())
        torch.testing.assert_close(gf, F.grad[rows])
        torch.testing.assert_close(gg, G.grad[rows])
        torch.testing.assert_close(W, layer.W)
        assert lam == pytest.approx(layer.last_lambda, rel=1e-10)


def test_convert_sync_regbn_single_process():
    model = nn.ModuleDict({"a": regbn.RegBN(4, 3, [], []), "lin": nn.Linear(2, 2)})
    model["a"](torch.randn(5, 4), torch.randn(5, 3))
    sd = buffers(model)
    out = regbn.convert_sync_regbn(model)
    assert isinstance(out["a"], regbn.RegBN) and isinstance(out["lin"], nn.Linear)
    same_buffers(sd, buffers(out))
    out.eval()
    x = (torch.randn(2, 4), torch.randn(2, 3))
    f_r, _ = out["a"](*x)
    assert f_r.shape == (2, 4)
    assert isinstance(regbn.convert_sync_regbn(regbn.RegBN(), process_group=None), regbn.RegBN)


# ----------------------------------------------------------------------------- §3 models
class Branch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.gray_net = Branch(1)
        self.colored_net = Branch(3)
        self.head = nn.Linear(10, 4)

    def forward(self, gray, colored):
        return self.head(torch.cat([self.gray_net(gray), self.colored_net(colored)], dim=1))


class Clash(nn.Module):
    """Input ``gray`` and module ``gray``: the bare name "gray" is ambiguous."""

    def __init__(self):
        super().__init__()
        self.gray = nn.Linear(3, 3)
        self.colored = nn.Linear(4, 4)

    def forward(self, gray, colored):
        return torch.cat([self.gray(gray), self.colored(colored)], 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, y):
        x = x + self.a(x)  # residual: one modality
        return x * self.b(y)  # fusion


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Linear(3, 4)
        self.video = nn.Linear(5, 4)

    def forward(self, batch):
        return self.audio(batch["audio"]) + self.video(batch["video"])


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y, double=False):
        if double:
            x = 2 * x
        return torch.cat([self.a(x), self.b(y)], 1)


def branchy(x):
    if x.sum() > 0:
        return x
    return -x


class Autowrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        return torch.cat([branchy(self.a(x)), self.b(y)], 1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, y):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return y


def two_inputs(b=4):
    return torch.randn(b, 1, 6, 6), torch.randn(b, 3, 6, 6)


def regbn_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, regbn.RegBN)}


# ----------------------------------------------------------------------------- §3 insert
def test_insert_returns_graphmodule_caller_unchanged_shared_params():
    torch.manual_seed(13)
    model = TwoBranch()
    x = two_inputs()
    ref = model(*x)
    names = [n for n, _ in model.named_modules()]
    fwd = model.forward
    patched = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc")], example_inputs=x)
    assert isinstance(patched, torch.fx.GraphModule)
    assert list(regbn_layers(patched)) == ["regbn_0"]
    assert [n for n, _ in model.named_modules()] == names and model.forward == fwd
    assert type(model) is TwoBranch
    torch.testing.assert_close(model(*x), ref)
    sd, psd = model.state_dict(), patched.state_dict()
    for k, v in sd.items():
        assert k in psd and torch.equal(psd[k], v)
        assert psd[k].data_ptr() == v.data_ptr()  # shared, not copied
    copied = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc")], example_inputs=x,
                          copy=True)
    csd = copied.state_dict()
    for k, v in sd.items():
        assert torch.equal(csd[k], v) and csd[k].data_ptr() != v.data_ptr()
    missing, unexpected = patched.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("regbn_") for k in missing)


def test_insert_rewires_later_uses_and_passes_kwargs():
    torch.manual_seed(14)
    model = TwoBranch()
    x = two_inputs(6)
    patched = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc")], example_inputs=x,
                           lambda_rule="official", momentum=0.5)
    layer = patched.regbn_0
    assert tuple(layer.W.shape) == (5, 5)  # dims inferred, Dg×Df
    hand = regbn.RegBN(5, 5, [], [], lambda_rule="official", momentum=0.5)
    f_r, g_out = hand(model.gray_net(x[0]), model.colored_net(x[1]))
    expected = model.head(torch.cat([f_r, g_out], 1))
    torch.testing.assert_close(patched(*x), expected)
    torch.testing.assert_close(layer.W, hand.W)


def test_insert_pair_name_forms():
    model = TwoBranch()
    x = two_inputs()
    for pair, dims in [(("gray", "colored"), (108, 36)),
                       (("input:gray", "input:colored"), (108, 36)),
                       (("gray_net", "colored_net"), (5, 5)),
                       (("module:gray_net.conv", "module:colored_net.conv"), (32, 32))]:
        patched = regbn.insert(model, pairs=[pair], example_inputs=x)
        assert patched(*x).shape == (4, 4)
        assert list(regbn_layers(patched)) == ["regbn_0"]
        assert tuple(patched.regbn_0.W.shape) == dims, pair


def test_insert_by_fx_node_name():
    model = TwoBranch()
    x = two_inputs()
    report = regbn.inspect(model, example_inputs=x)
    rows = {r.name: r for r in report.rows}
    relu = [r.name for r in report.rows if r.module == "gray_net" and "relu" in r.name]
    flat = [r.name for r in report.rows if r.module == "colored_net" and "flatten" in r.name]
    assert relu and flat
    patched = regbn.insert(model, pairs=[(relu[0], flat[0])], example_inputs=x)
    assert tuple(patched.regbn_0.W.shape) == (32, 2 * 4 * 4)
    assert rows[flat[0]].shape == (4, 32)
    assert patched(*x).shape == (4, 4)


def test_several_pairs_in_order_and_chained():
    torch.manual_seed(15)
    model = TwoBranch()
    x = two_inputs(6)
    patched = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc"),
                                         ("colored_net.fc", "gray_net.fc")], example_inputs=x)
    assert list(regbn_layers(patched)) == ["regbn_0", "regbn_1"]
    a, b = regbn.RegBN(5, 5, [], []), regbn.RegBN(5, 5, [], [])
    f1, g1 = a(model.gray_net(x[0]), model.colored_net(x[1]))
    f2, g2 = b(g1, f1)
    torch.testing.assert_close(patched(*x), model.head(torch.cat([g2, f2], 1)))


def test_ambiguous_name_lists_candidates_and_prefix_resolves():
    model = Clash()
    x = (torch.randn(4, 3), torch.randn(4, 4))
    with pytest.raises(Exception, match=r"(?i)ambiguous") as e:
        regbn.insert(model, pairs=[("gray", "colored")], example_inputs=x)
    assert "input:" in str(e.value) and "module:" in str(e.value)
    p1 = regbn.insert(model, pairs=[("input:gray", "input:colored")], example_inputs=x)
    p2 = regbn.insert(model, pairs=[("module:gray", "module:colored")], example_inputs=x)
    assert tuple(p1.regbn_0.W.shape) == tuple(p2.regbn_0.W.shape) == (4, 3)
    assert p1(*x).shape == p2(*x).shape == (4, 7)


def test_unknown_name_close_matches_and_inspect_hint():
    model = TwoBranch()
    x = two_inputs()
    with pytest.raises(Exception) as e:
        regbn.insert(model, pairs=[("gray_net.fcc", "colored_net.fc")], example_inputs=x)
    msg = str(e.value)
    assert "gray_net.fc" in msg and "regbn.inspect" in msg


def test_f_feeds_g_refused_and_nothing_edited():
    model = TwoBranch()
    x = two_inputs()
    ref = model(*x)
    with pytest.raises(Exception, match=r"(?i)cycle|feeds|depends") as e:
        regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc"),
                                   ("gray_net.conv", "gray_net.fc")], example_inputs=x)
    assert "gray_net.conv" in str(e.value)
    assert not regbn_layers(model)
    torch.testing.assert_close(model(*x), ref)


def test_auto_and_remove():
    torch.manual_seed(16)
    model = TwoBranch()
    x = two_inputs()
    fus = regbn.find_fusions(model, example_inputs=x)
    assert len(fus) == 1 and fus[0].kind == "cat"
    patched = regbn.insert(model, pairs="auto", example_inputs=x)
    assert list(regbn_layers(patched)) == ["regbn_0"]
    manual = regbn.insert(model, pairs=[tuple(fus[0].pair)], example_inputs=x)
    patched.eval(), manual.eval()
    torch.testing.assert_close(patched(*x), manual(*x))
    plain_gm = regbn.remove(patched)
    assert not regbn_layers(plain_gm)
    torch.testing.assert_close(plain_gm(*x), model(*x))
    assert regbn_layers(patched)  # remove returns a model; patched keeps its layers


def test_graphmodule_accepted():
    model = TwoBranch()
    x = two_inputs()
    gm = torch.fx.symbolic_trace(model)
    code = gm.code
    patched = regbn.insert(gm, pairs=[("gray_net.fc", "colored_net.fc")], example_inputs=x)
    assert isinstance(patched, torch.fx.GraphModule) and regbn_layers(patched)
    assert not regbn_layers(gm) and gm.code == code
    torch.testing.assert_close(gm(*x), model(*x))
    # a GraphModule from a custom tracer (Branch kept whole) is used as it is
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Branch) or super().is_leaf_module(m, qualname)
    custom = torch.fx.GraphModule(model, LeafTracer().trace(model))
    p2 = regbn.insert(custom, pairs=[("gray_net", "colored_net")], example_inputs=x)
    assert any(n.op == "call_module" and n.target == "gray_net" for n in p2.graph.nodes)
    assert not any(str(n.target).startswith("gray_net.") for n in p2.graph.nodes)


def test_tracing_options():
    x = (torch.randn(4, 3), torch.randn(4, 3))
    p = regbn.insert(Flagged(), pairs=[("a", "b")], example_inputs=x,
                     concrete_args={"double": True})
    assert p(*x).shape == (4, 6)
    p = regbn.insert(Autowrap(), pairs=[("a", "b")], example_inputs=x,
                     autowrap_functions=[branchy])
    assert p(*x).shape == (4, 6)
    model = TwoBranch()
    xs = two_inputs()
    for leaf in ([Branch], ["gray_net", "colored_net"]):
        p = regbn.insert(model, pairs=[("gray_net", "colored_net")], example_inputs=xs,
                         leaf_modules=leaf)
        assert any(n.op == "call_module" and n.target == "gray_net" for n in p.graph.nodes)
        assert p(*xs).shape == (4, 4)


def test_untraceable_error_names_module_and_line():
    with pytest.raises(Exception) as e:
        regbn.insert(Untraceable(), pairs=[("x", "y")],
                     example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))
    msg = str(e.value)
    assert "Untraceable" in msg
    assert "test_contract.py" in msg and re.search(r"line \d+|:\d+", msg)
    assert "leaf_modules" in msg and "concrete_args" in msg


# ----------------------------------------------------------------------------- §4 inspect
def test_inspect_rows_and_outputs(tmp_path):
    model = TwoBranch()
    x = two_inputs(2)
    report = regbn.inspect(model, example_inputs=x)
    rows = {r.name: r for r in report.rows}
    assert [r.name for r in report.rows] == [n.name for n in
                                             torch.fx.symbolic_trace(model).graph.nodes]
    for r in report.rows:
        for attr in ("name", "module", "op", "target", "shape", "dtype", "modalities",
                     "is_fusion"):
            assert hasattr(r, attr)
    fc = [r for r in report.rows if r.module == "gray_net.fc"]
    assert fc and fc[-1].shape == (2, 5) and set(fc[-1].modalities) == {"gray"}
    assert fc[-1].dtype == torch.float32
    assert rows["gray"].op == "placeholder"
    fus = [r for r in report.rows if r.is_fusion]
    assert len(fus) == 1 and set(fus[0].modalities) == {"gray", "colored"}
    assert fus[0].shape == (2, 10)
    assert [r.name for r in report.rows if r.module == "head"][-1]
    assert rows[fus[0].name].module is None
    text = str(report)
    assert fus[0].name in text and "gray_net.fc" in text
    assert "<table" in report._repr_html_()
    d = report.to_dict()
    json.dumps(d)
    for suffix in (".svg", ".png"):
        path = tmp_path / f"model{suffix}"
        report.draw(str(path))
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in path.read_bytes()


def test_find_fusions_fields_and_kinds():
    model = TwoBranch()
    x = two_inputs(2)
    (f,) = regbn.find_fusions(model, example_inputs=x)
    assert f.kind == "cat" and len(f.operands) == 2
    assert [set(m) for m in f.modalities] == [{"gray"}, {"colored"}]
    assert [tuple(s) for s in f.shapes] == [(2, 5), (2, 5)]
    assert len(f.pair) == 2
    r = regbn.find_fusions(Residual(), example_inputs=(torch.randn(2, 4), torch.randn(2, 4)))
    assert [fu.kind for fu in r] == ["mul"]


def test_example_inputs_as_kwargs_dict():
    model = TwoBranch()
    gray, colored = two_inputs(2)
    report = regbn.inspect(model, example_inputs={"gray": gray, "colored": colored})
    assert sum(r.is_fusion for r in report.rows) == 1
    p = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc")],
                     example_inputs={"colored": colored, "gray": gray})
    assert p(gray, colored).shape == (2, 4)


def test_dict_of_tensors_entries_are_modalities():
    model = DictIn()
    batch = {"audio": torch.randn(2, 3), "video": torch.randn(2, 5)}
    (f,) = regbn.find_fusions(model, example_inputs=(batch,))
    assert f.kind == "add"
    assert [set(m) for m in f.modalities] == [{"batch['audio']"}, {"batch['video']"}]
    report = regbn.inspect(model, example_inputs={"batch": batch})
    assert sum(r.is_fusion for r in report.rows) == 1
    p = regbn.insert(model, pairs="auto", example_inputs=(batch,))
    assert p(batch).shape == (2, 4)


def test_input_shapes_fake_and_meta_model():
    model = TwoBranch()
    a = regbn.inspect(model, example_inputs=two_inputs(2))
    b = regbn.inspect(model, input_shapes=[(2, 1, 6, 6), (2, 3, 6, 6)])
    assert [(r.name, r.shape) for r in a.rows] == [(r.name, r.shape) for r in b.rows]
    with torch.device("meta"):
        big = TwoBranch()
    c = regbn.inspect(big, input_shapes=[(2, 1, 6, 6), (2, 3, 6, 6)])
    assert [(r.name, r.shape) for r in c.rows] == [(r.name, r.shape) for r in a.rows]
    fus = regbn.find_fusions(big, input_shapes=[(2, 1, 6, 6), (2, 3, 6, 6)])
    assert len(fus) == 1 and [tuple(s) for s in fus[0].shapes] == [(2, 5), (2, 5)]


def test_residual_add_not_fusion():
    report = regbn.inspect(Residual(), example_inputs=(torch.randn(2, 4), torch.randn(2, 4)))
    adds = [r for r in report.rows if "add" in r.name]
    assert adds and not any(r.is_fusion for r in adds)
    assert [r.name for r in report.rows if r.is_fusion] == ["mul"]


# ----------------------------------------------------------------------------- CLI
CLI_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.gray_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2*26*26, 5))
            self.colored_net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(),
                                             nn.Linear(2*26*26, 5))
            self.head = nn.Linear(10, 4)

        def forward(self, gray, colored):
            return self.head(torch.cat([self.gray_net(gray), self.colored_net(colored)], 1))

    def two_branch():
        return TwoBranch()

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.img = nn.Embedding(10, 4), nn.Linear(3, 4)
        def forward(self, ids, image):
            return self.emb(ids) @ self.img(image).transpose(1, 2)

    def tok():
        return Tok()

    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def bad():
        return Bad()

    def boom():
        raise RuntimeError("kaput")
""")


def _cli(args, cwd, entry="module"):
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "regbn", *args] if entry == "module" else \
        [os.path.join(os.path.dirname(sys.executable), "regbn"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_inspect_prints_table_and_fusions(tmp_path):
    (tmp_path / "cmods.py").write_text(CLI_MODELS)
    r = _cli(["inspect", "cmods:two_branch", "--input", "2x1x28x28", "--input", "2x3x28x28"],
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert "gray_net" in r.stdout and "cat" in r.stdout
    r2 = _cli(["inspect", "cmods.py:tok", "--input", "2x5:int64", "--input", "2x6x3"], tmp_path,
              entry="script")
    assert r2.returncode == 0, r2.stderr
    assert "matmul" in r2.stdout


@pytest.mark.parametrize("args", [["inspect", "cmods:nope", "--input", "2x4"],
                                  ["inspect", "cmods:two_branch", "--input", "2xAx28"],
                                  ["inspect", "cmods:bad", "--input", "2x4"],
                                  ["inspect", "no_such_module:f", "--input", "2x4"],
                                  ["inspect", "cmods:boom", "--input", "2x4"],
                                  ["inspect"], ["bogus"],
                                  ["inspect", "cmods:two_branch", "--input", "2x1x28x28",
                                   "--input", "2x3x28x28", "--input", "2x3"],
                                  ["inspect", "cmods:two_branch", "--input", "2x1x28x28"],
                                  ["inspect", "cmods:two_branch", "--input", "2x1x28x28",
                                   "--input", "2x3x27x27"]])
def test_cli_errors_one_line_no_traceback(tmp_path, monkeypatch, capsys, args):
    """``python -m regbn`` in-process (runpy): an error is SystemExit(!=0) and one stderr line."""
    import runpy
    (tmp_path / "cmods.py").write_text(CLI_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cmods", None)
    monkeypatch.setattr(sys, "argv", ["regbn", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("regbn", run_name="__main__", alter_sys=True)
    assert e.value.code not in (0, None)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- more edges
def test_lazy_failed_first_call_changes_nothing():
    layer = regbn.RegBN()
    with pytest.raises(ValueError):
        layer(torch.randn(1, 4), torch.randn(1, 3))  # a training batch of 1
    f_r, _ = layer(torch.randn(5, 6), torch.randn(5, 2))  # a fresh lazy layer accepts this
    assert tuple(layer.W.shape) == (2, 6)


def test_lambda_accuracy_over_scales():
    for scale in (1e-3, 1.0, 1e3, 1e6):
        _check_scale(scale)


def _check_scale(scale):
    torch.manual_seed(17)
    F, G = scale * torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    layer = plain(4, 9)
    f_r, _ = layer(F, G, is_training=True)
    lam = ref_lambda(F, G)
    assert layer.last_lambda == pytest.approx(lam, rel=1e-8, abs=1e-12)
    torch.testing.assert_close(f_r, F - G @ ref_W(F, G, lam), rtol=1e-7, atol=1e-9 * scale)


def test_degenerate_batches_stay_finite():
    for F, G in [(torch.randn(4, 3), torch.zeros(4, 5)), (torch.zeros(4, 3), torch.randn(4, 5)),
                 (torch.randn(4, 3), torch.ones(4, 5)), (torch.randn(2, 3), torch.randn(2, 5))]:
        layer = regbn.RegBN(3, 5, [], [], normalize_output=False)
        f_r, g_out = layer(F, G)
        assert torch.isfinite(f_r).all() and torch.isfinite(layer.W).all()
        if not G.any() or not F.any():
            assert layer.last_lambda == 0.0
            torch.testing.assert_close(f_r, F)


def test_sigma_thr_drops_small_singular_values():
    torch.manual_seed(18)
    U, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    S = torch.tensor([5.0, 3.0, 0.4, 0.1], dtype=torch.float64)
    G = U @ torch.diag(S) @ V.T
    F = 3 * torch.randn(10, 5, dtype=torch.float64)
    layer = plain(5, 6, sigma_THR=0.2, sigma_MIN=0.0)
    f_r, _ = layer(F, G, is_training=True)
    Gt = U[:, :2] @ torch.diag(S[:2]) @ V[:, :2].T
    lam = ref_lambda(F, Gt)
    assert layer.last_lambda == pytest.approx(lam, rel=1e-8)
    torch.testing.assert_close(f_r, F - Gt @ ref_W(F, Gt, lam), rtol=1e-8, atol=1e-10)


def test_gradcheck_other_branches():
    torch.manual_seed(19)
    for rule, scale in [("paper", 0.01), ("official", 1.0)]:
        layer = plain(2, 3, lambda_rule=rule)
        F = (scale * torch.randn(6, 2, dtype=torch.float64)).requires_grad_()
        G = torch.randn(6, 3, dtype=torch.float64).requires_grad_()
        layer(F, G)
        assert (layer.last_lambda == 0.0) == (rule == "paper")
        assert torch.autograd.gradcheck(lambda a, b, m=layer: m(a, b, is_training=True)[0],
                                        (F, G), eps=1e-6, atol=1e-5)
    # with both normalisations (BatchNorm2d in, LayerNorm out)
    layer = regbn.RegBN(2, 3, [2, 2], [], normalize_input=True).double()
    F = torch.randn(5, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    G = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, is_training=True), (F, G),
                                    eps=1e-6, atol=1e-5)


def test_n_epoch_irrelevant_and_eval_batch_of_one_with_batchnorm():
    a = regbn.RegBN(2, 3, [3, 3], [], normalize_input=True)
    b = regbn.RegBN(2, 3, [3, 3], [], normalize_input=True)
    for _ in range(3):
        x = (torch.randn(5, 2, 3, 3), torch.randn(5, 3))
        a(*x, is_training=True, n_epoch=1)
        b(*x, is_training=True, n_epoch=7, steps_per_epoch=3)
    assert torch.equal(a.W, b.W)
    before = buffers(a)
    a(torch.randn(4, 2, 3, 3), torch.randn(4, 3), is_training=False)  # train-mode layer
    a.eval()
    f_r, g_out = a(torch.randn(1, 2, 3, 3), torch.randn(1, 3))
    assert f_r.shape == (1, 2, 3, 3) and torch.isfinite(f_r).all()
    same_buffers(before, buffers(a))  # BatchNorm running statistics included


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        return torch.cat([self.enc(x), self.enc(y)], 1)


class TupIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

    def forward(self, pair):
        return self.a(pair[0]) * self.b(pair[1])


class TwiceG(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        f, g = self.a(x), self.b(y)
        return torch.cat([f, g], 1) + torch.cat([g, g], 1)


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(3, 3), Inner())

    def forward(self, x, y):
        return torch.cat([self.enc(x), y], 1)


def test_module_called_twice_is_ambiguous():
    x = (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(Exception, match=r"(?i)ambiguous") as e:
        regbn.insert(Shared(), pairs=[("enc", "y")], example_inputs=x)
    assert "enc_1" in str(e.value)
    p = regbn.insert(Shared(), pairs=[("node:enc", "node:enc_1")], example_inputs=x)
    assert p(*x).shape == (4, 6)


def test_every_use_rewired_and_tuple_inputs():
    torch.manual_seed(20)
    x = (torch.randn(4, 3), torch.randn(4, 3))
    m = TwiceG()
    p = regbn.insert(m, pairs=[("a", "b")], example_inputs=x)
    fr, go = regbn.RegBN(3, 3, [], [])(m.a(x[0]), m.b(x[1]))
    torch.testing.assert_close(p(*x), torch.cat([fr, go], 1) + torch.cat([go, go], 1))
    (fu,) = regbn.find_fusions(TupIn(), example_inputs=((torch.randn(2, 3), torch.randn(2, 5)),))
    assert fu.kind == "mul" and [set(s) for s in fu.modalities] == [{"pair[0]"}, {"pair[1]"}]


def test_meta_model_larger_than_machine():
    with torch.device("meta"):
        huge = Shared()
        huge.enc = nn.Linear(100_000, 100_000)  # 40 GB of float32 weights
    fus = regbn.find_fusions(huge, input_shapes=[(2, 100_000), (2, 100_000)])
    assert len(fus) == 1 and [tuple(s) for s in fus[0].shapes] == [(2, 100_000)] * 2
    report = regbn.inspect(Shared(), input_shapes=[(10**10, 3), (10**10, 3)])  # 120 GB inputs
    assert [r.shape for r in report.rows if r.is_fusion] == [(10**10, 6)]


def test_nested_untraceable_names_submodule():
    with pytest.raises(Exception) as e:
        regbn.inspect(Outer(), example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))
    msg = str(e.value)
    assert "enc.1" in msg and "test_contract.py" in msg and "leaf_modules" in msg


class GFeedsF(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, y):
        g = self.b(y)
        f = self.a(g + x)
        return torch.cat([f, g], 1)


def test_g_feeding_f_is_a_valid_pair():
    torch.manual_seed(21)
    m = GFeedsF()
    x = (torch.randn(4, 3), torch.randn(4, 3))
    p = regbn.insert(m, pairs=[("a", "b")], example_inputs=x)
    g = m.b(x[1])
    f_r, g_out = regbn.RegBN(3, 3, [], [])(m.a(g + x[0]), g)
    torch.testing.assert_close(p(*x), torch.cat([f_r, g_out], 1))


class Keys(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(2, 2)
        self.b.weight = self.a.weight  # tied
        self.bn = nn.BatchNorm1d(3)
        self.p = nn.Parameter(torch.zeros(3))

    def forward(self, x, y):
        return torch.cat([self.bn(self.a(x)) + self.p, self.b(y)], 1)


def test_state_dict_keys_kept_and_resume_training_bit_exact():
    m = Keys()
    x = (torch.randn(4, 3), torch.randn(4, 3))
    sd = m.state_dict()
    for copy in (False, True):
        p = regbn.insert(m, pairs=[("bn", "b")], example_inputs=x, copy=copy)
        psd = p.state_dict()
        assert all(k in psd and torch.equal(psd[k], v) for k, v in sd.items())
        assert set(regbn.remove(p).state_dict()) == set(sd)
    assert int(m.bn.num_batches_tracked) == 0  # insert ran nothing on the caller's buffers
    torch.manual_seed(22)
    xs = [(torch.randn(5, 4), torch.randn(5, 3, 2)) for _ in range(3)]
    a = regbn.RegBN(4, 3, [], [2], normalize_input=True)
    a(*xs[0]), a(*xs[1])
    import copy as _copy
    ckpt = _copy.deepcopy(a.state_dict())
    a(*xs[2])
    b = regbn.RegBN(4, 3, [], [2], normalize_input=True)
    b.load_state_dict(ckpt)
    b(*xs[2])
    assert torch.equal(a.W, b.W) and a.last_lambda == b.last_lambda

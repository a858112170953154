"""regbn.RegBN: shapes, modes, buffers, normalisations, checkpoints and bad input."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as TF
from reference import reference

import regbn
from regbn import RegBN

# (f feature shape, g feature shape): vectors, 1D/2D/3D maps, tokens, the official README's shape
LAYER_SHAPES = {
    "vector": ((12,), (5,)),
    "map1d": ((3, 8), (2, 6)),
    "map2d": ((2, 5, 5), (3, 4, 4)),
    "map3d": ((2, 3, 3, 3), (1, 2, 4, 2)),
    "tokens": ((6, 4), (3, 8)),
    "vector_vs_map": ((32,), (8, 3, 3)),
}


def make(fs, gs, **kw) -> RegBN:
    return RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]), **kw)


def batch(B, fs, gs, seed=0, dtype=torch.float64, g_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, *fs, generator=gen, dtype=dtype)
    g = g_scale * torch.randn(B, *gs, generator=gen, dtype=dtype)
    return f, g


def buffers(layer: RegBN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_buffers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan() == b[k].isnan()).all() and torch.equal(
            a[k].nan_to_num(), b[k].nan_to_num()), k


# ----------------------------------------------------------------------------- training output
@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("name", list(LAYER_SHAPES), ids=list(LAYER_SHAPES))
def test_training_output_matches_reference(name, rule):
    fs, gs = LAYER_SHAPES[name]
    layer = make(fs, gs, normalize_output=False, lambda_rule=rule).double()
    f, g = batch(10, fs, gs, g_scale=0.5)
    f_r, g_out = layer(f, g)
    ref = reference(f, g, rule)
    assert f_r.shape == f.shape and g_out.shape == g.shape
    torch.testing.assert_close(f_r.reshape(10, -1), ref.f_r, rtol=1e-9, atol=1e-10)
    assert torch.equal(g_out, g)
    assert layer.last_lambda == pytest.approx(ref.lam, rel=1e-9)


@pytest.mark.parametrize("name", ["vector", "map2d", "tokens"])
def test_output_normalisation_is_layernorm_over_channels_and_space(name):
    fs, gs = LAYER_SHAPES[name]
    f, g = batch(8, fs, gs)
    plain = make(fs, gs, normalize_output=False).double()
    normed = make(fs, gs).double()
    f_raw, _ = plain(f, g)
    f_r, g_out = normed(f, g)
    torch.testing.assert_close(f_r, TF.layer_norm(f_raw, list(fs)))
    torch.testing.assert_close(g_out, TF.layer_norm(g, list(gs)))


@pytest.mark.parametrize("name", ["vector", "map1d", "map2d", "map3d", "tokens"])
def test_input_normalisation_uses_the_normalised_pair(name):
    fs, gs = LAYER_SHAPES[name]
    f, g = batch(9, fs, gs)
    layer = make(fs, gs, normalize_input=True, normalize_output=False).double()
    f_r, g_out = layer(f, g)

    def norm(x, shape):
        if len(shape) - 1 >= 2:  # BatchNorm over channels, batch statistics in training
            return TF.batch_norm(x, None, None, training=True)
        return TF.layer_norm(x, list(shape))

    fn, gn = norm(f, fs), norm(g, gs)
    ref = reference(fn, gn)
    torch.testing.assert_close(f_r.reshape(9, -1), ref.f_r, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(g_out, gn)
    kinds = {type(layer.norm_f).__name__, type(layer.norm_g).__name__}
    assert kinds <= {"LayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}


def test_affine_switches_learnable_norms():
    layer = make((4, 3, 3), (2,), normalize_input=True, affine=True)
    names = {n for n, _ in layer.named_parameters()}
    assert {"norm_f.weight", "norm_f.bias", "norm_f_out.weight", "norm_g_out.weight"} <= names
    assert not list(make((4, 3, 3), (2,), normalize_input=True).parameters())


# ----------------------------------------------------------------------------- running update
def test_running_update_follows_paper_eq6():
    fs, gs = (7,), (4, 2)
    layer = make(fs, gs, momentum=0.3, beta1=0.8, beta2=0.95).double()
    W = torch.zeros(8, 7, dtype=torch.float64)
    m = v = 0.0
    for t in range(1, 5):
        f, g = batch(6, fs, gs, seed=t)
        layer(f, g)
        Wb = reference(f, g).W
        d = float((W - Wb).abs().mean())
        m = 0.8 * m + 0.2 * d
        v = 0.95 * v + 0.05 * d * d
        eta = 0.3 * (m / (1 - 0.8**t)) / (math.sqrt(v / (1 - 0.95**t)) + 1e-8)
        W = (1 - eta) * W + eta * Wb
        torch.testing.assert_close(layer.W, W, rtol=1e-9, atol=1e-12)
        assert int(layer.num_batches_tracked) == t
    hist = layer.lambda_history[~layer.lambda_history.isnan()]
    assert hist.numel() == 4 and float(hist[-1]) == layer.last_lambda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_update_in_the_kept_workspace_matches_eq6(dtype):
    """W_batch is formed in a scratch tensor kept across steps; the update must not drift."""
    fs, gs = (16,), (4, 3, 3)
    layer = make(fs, gs).to(dtype)
    W = torch.zeros(36, 16, dtype=torch.float64)
    m = v = 0.0
    for t in range(1, 6):
        f, g = batch(10, fs, gs, seed=20 + t, dtype=dtype)
        layer(f, g)
        Wb = reference(f.double(), g.double()).W
        d = float((W - Wb).abs().mean())
        m, v = 0.9 * m + 0.1 * d, 0.99 * v + 0.01 * d * d
        eta = 0.02 * (m / (1 - 0.9**t)) / (math.sqrt(v / (1 - 0.99**t)) + 1e-8)
        W = (1 - eta) * W + eta * Wb
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.W.double(), W, **tol)


def test_workspace_is_scratch_only():
    """W_batch's scratch tensor, kept across steps, is no state: it is neither saved nor a
    buffer, copies and unpickled layers train on exactly like the original, and after a cast
    the next step works in the new dtype."""
    fs, gs = (16,), (4, 3, 3)
    layer = make(fs, gs)
    layer(*batch(10, fs, gs, dtype=torch.float32))
    fresh = make(fs, gs)
    assert set(layer.state_dict()) == set(fresh.state_dict())
    assert [n for n, _ in layer.named_buffers()] == [n for n, _ in fresh.named_buffers()]
    clones = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    step = batch(10, fs, gs, seed=1, dtype=torch.float32)
    layer(*step)
    for clone in clones:
        clone(*step)
        assert torch.equal(clone.W, layer.W)
        assert_same_buffers(buffers(clone), buffers(layer))
    layer.double()
    f_r, _ = layer(*batch(10, fs, gs, seed=2))
    assert f_r.dtype == torch.float64 == layer.W.dtype and bool(torch.isfinite(layer.W).all())


def test_eval_uses_and_never_changes_the_running_w():
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True, normalize_output=False).double()
    for seed in range(3):
        layer(*batch(8, fs, gs, seed=seed))
    layer.eval()
    before = buffers(layer)
    f, g = batch(5, fs, gs, seed=9)
    f_r, g_out = layer(f, g)
    assert_same_buffers(before, buffers(layer))
    fn = layer.norm_f(f).reshape(5, -1)
    gn = layer.norm_g(g).reshape(5, -1)
    torch.testing.assert_close(f_r.reshape(5, -1), fn - gn @ layer.W)
    # a batch of one is fine in eval
    f1, g1 = layer(f[:1], g[:1])
    torch.testing.assert_close(f1, f_r[:1])


def test_is_training_keyword_overrides_the_mode_and_official_kwargs_are_accepted():
    fs, gs = LAYER_SHAPES["vector"]
    layer = make(fs, gs).eval()
    f, g = batch(6, fs, gs, dtype=torch.float32)
    layer(f, g, is_training=True, n_epoch=3, steps_per_epoch=100)
    assert int(layer.num_batches_tracked) == 1
    layer.train()
    before = buffers(layer)
    layer(f, g, is_training=False)
    assert_same_buffers(before, buffers(layer))


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_is_bit_exact():
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True, affine=True)
    for seed in range(3):
        layer(*batch(8, fs, gs, seed=seed, dtype=torch.float32))
    keys = set(layer.state_dict())
    assert {"W", "adam_m", "adam_v", "num_batches_tracked", "lambda_history"} <= keys
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = make(fs, gs, normalize_input=True, affine=True)
    fresh.load_state_dict(torch.load(buf))
    layer.eval()
    fresh.eval()
    f, g = batch(4, fs, gs, seed=7, dtype=torch.float32)
    a, b = layer(f, g), fresh(f, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fresh.last_lambda == layer.last_lambda


def test_checkpoint_loads_into_a_lazy_layer():
    fs, gs = LAYER_SHAPES["map1d"]
    layer = make(fs, gs)
    layer(*batch(6, fs, gs, dtype=torch.float32))
    lazy = RegBN()
    assert lazy.has_uninitialized_params()
    lazy.load_state_dict(layer.state_dict())
    assert lazy.f_shape == fs and lazy.g_shape == gs
    assert torch.equal(lazy.W, layer.W)


def test_checkpoint_of_other_shapes_is_refused():
    layer = make((4,), (3,))
    other = make((5,), (3,))
    with pytest.raises(ValueError, match="checkpoint was saved for f_shape"):
        other.load_state_dict(layer.state_dict(), strict=False)


# ----------------------------------------------------------------------------- lazy shapes
def test_lazy_shapes_come_from_the_first_batch():
    layer = RegBN()
    assert "lazy" in repr(layer)
    f, g = batch(6, (3, 4, 4), (5,), dtype=torch.float32)
    layer(f, g)
    assert layer.f_shape == (3, 4, 4) and layer.g_shape == (5,)
    assert layer.W.shape == (5, 48)
    assert "f=(B, 3, 4, 4)" in repr(layer)
    with pytest.raises(ValueError, match=r"f must have shape \(B, 3, 4, 4\)"):
        layer(*batch(6, (3, 4, 5), (5,), dtype=torch.float32))


def test_repr_shows_shapes():
    text = repr(make((512,), (64, 7, 7)))
    assert "f=(B, 512)" in text and "g=(B, 64, 7, 7)" in text and "3136×512" in text


# ----------------------------------------------------------------------------- dtypes, devices
def test_float32_constraint_and_dtype():
    fs, gs = (512,), (64, 7, 7)
    layer = make(fs, gs)
    f, g = batch(50, fs, gs, dtype=torch.float32)
    f_r, g_out = layer(f, g)
    assert f_r.dtype == torch.float32 and g_out.dtype == torch.float32
    assert layer.W.dtype == torch.float32


def test_autocast_runs_the_solve_in_float32():
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs)
    f, g = batch(8, fs, gs, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_r, g_out = layer(f.bfloat16(), g.bfloat16())
    assert f_r.dtype == torch.float32 and torch.isfinite(f_r).all()
    ref, _ = make(fs, gs)(f.bfloat16().float(), g.bfloat16().float())
    torch.testing.assert_close(f_r, ref)


def test_half_inputs_outside_autocast_come_back_in_their_dtype():
    layer = make((6,), (3,))
    f, g = batch(8, (6,), (3,), dtype=torch.float32)
    f_r, g_out = layer(f.bfloat16(), g.bfloat16())
    assert f_r.dtype == torch.bfloat16 and g_out.dtype == torch.bfloat16


def test_gpu_argument_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="gpu=0 is ignored"):
        RegBN(4, 3, [], [], gpu=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RegBN(4, 3, [], [])


# ----------------------------------------------------------------------------- gradients
GRAD_SHAPES = {"vector": ((6,), (5,)), "map2d": ((2, 3, 3), (2, 2, 2)), "tokens": ((3, 2), (2, 4))}


@pytest.mark.parametrize("name,normalize_input", [("vector", False), ("map2d", True),
                                                  ("tokens", False)])
def test_gradcheck_training_mode(name, normalize_input):
    fs, gs = GRAD_SHAPES[name]
    layer = make(fs, gs, normalize_input=normalize_input).double()
    f, g = batch(4, fs, gs, seed=3, g_scale=0.5)
    f.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, g: layer(f, g), (f, g), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


def test_eval_gradients_flow_to_both_inputs():
    layer = make((4,), (3,)).double()
    layer(*batch(6, (4,), (3,)))
    layer.eval()
    f, g = batch(3, (4,), (3,), seed=1)
    f.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, g: layer(f, g), (f, g))


# ----------------------------------------------------------------------------- bad input
def test_batch_sizes_that_differ():
    layer = make((4,), (3,))
    with pytest.raises(ValueError, match=r"batch sizes \(dim 0\) must match; got f \(6, 4\) "
                                         r"and g \(5, 3\)"):
        layer(torch.randn(6, 4), torch.randn(5, 3))


def test_shape_that_differs_from_the_declared_one():
    layer = make((4,), (3, 2))
    with pytest.raises(ValueError, match=r"g must have shape \(B, 3, 2\) as declared.*got "
                                         r"\(6, 3, 3\)"):
        layer(torch.randn(6, 4), torch.randn(6, 3, 3))


def test_training_batch_of_one():
    layer = make((4,), (3,))
    with pytest.raises(ValueError, match="at least 2 samples.*got a batch of 1.*layer.eval()"):
        layer(torch.randn(1, 4), torch.randn(1, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["f", "g"])
def test_non_finite_training_input_changes_no_buffer(which, bad):
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True, affine=True)
    layer(*batch(6, fs, gs, dtype=torch.float32))
    before = buffers(layer)
    f, g = batch(6, fs, gs, seed=1, dtype=torch.float32)
    (f if which == "f" else g)[2, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=f"training input {which} holds non-finite values"):
        layer(f, g)
    assert_same_buffers(before, buffers(layer))


def test_projection_larger_than_the_limit():
    with pytest.raises(ValueError, match=r"W would be Dg×Df = 3136×512.*max_projection_bytes=1000"
                                         r".*pooled"):
        RegBN(512, 64, [], [7, 7], max_projection_bytes=1000)
    lazy = RegBN(max_projection_bytes=100)
    with pytest.raises(ValueError, match="max_projection_bytes=100"):
        lazy(torch.randn(4, 10), torch.randn(4, 10))


def test_failed_solve_restores_input_norm_statistics(monkeypatch):
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True)
    before = buffers(layer)

    def boom(*a, **k):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(regbn.layer, "solve_batch", boom)
    with pytest.raises(RuntimeError, match="solver failed"):
        layer(*batch(6, fs, gs, dtype=torch.float32))
    assert_same_buffers(before, buffers(layer))


def test_half_keeps_the_solver_state_in_float64():
    """model.half() rounds W, as asked, but not λ⁺ (which can exceed float16's range) or the
    Adam moments."""
    fs, gs = LAYER_SHAPES["vector"]
    layer = make(fs, gs)
    f, g = batch(6, fs, gs, dtype=torch.float32, g_scale=30.0)
    f = 1000.0 * f
    layer(f, g)
    lam = layer.last_lambda
    assert lam > 7e4  # beyond float16
    layer.half()
    assert layer.W.dtype == torch.float16
    for name in ("adam_m", "adam_v", "lambda_history"):
        assert getattr(layer, name).dtype == torch.float64, name
    assert layer.last_lambda == lam
    f_r, _ = layer(f.half(), g.half())
    assert f_r.dtype == torch.float16 and bool(torch.isfinite(f_r).all())
    assert layer.adam_m.dtype == torch.float64 and math.isfinite(layer.last_lambda)


def test_failure_after_the_solve_restores_input_norm_statistics(monkeypatch):
    """The Dg×Df workspace is allocated after the input norms ran; its failure must undo them."""
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True)
    layer(*batch(6, fs, gs, dtype=torch.float32))
    before = buffers(layer)

    def boom(self):
        raise torch.OutOfMemoryError("simulated: no room for the workspace")

    monkeypatch.setattr(RegBN, "_workspace", boom)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        layer(*batch(6, fs, gs, dtype=torch.float32, seed=1))
    assert_same_buffers(before, buffers(layer))


def test_non_finite_solution_is_rejected_without_touching_buffers(monkeypatch):
    fs, gs = LAYER_SHAPES["vector"]
    layer = make(fs, gs, normalize_input=True)
    layer(*batch(6, fs, gs, dtype=torch.float32))
    before = buffers(layer)
    real = regbn.layer.solve_batch

    def overflowing(*a, **k):
        sol = real(*a, **k)
        sol.f_r = sol.f_r * math.inf
        return sol

    monkeypatch.setattr(regbn.layer, "solve_batch", overflowing)
    with pytest.raises(ValueError, match="batch solution is not finite.*Rescale the inputs"):
        layer(*batch(6, fs, gs, dtype=torch.float32, seed=1))
    assert_same_buffers(before, buffers(layer))


@pytest.mark.parametrize("scale", [1e-20, 1e19])
def test_extreme_but_finite_float32_batches_keep_the_state_finite(scale):
    layer = make((5,), (12,), normalize_output=False)
    layer(*batch(8, (5,), (12,), dtype=torch.float32))
    f, g = batch(8, (5,), (12,), dtype=torch.float32, seed=1)
    f_r, _ = layer(scale * f, scale * g)
    assert bool(torch.isfinite(f_r).all())
    for name in ("W", "adam_m", "adam_v"):
        assert bool(torch.isfinite(getattr(layer, name)).all()), name
    assert math.isfinite(layer.last_lambda)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\); got 1.0"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"momentum": -1}, r"momentum must be a number in \(0, 1\].*got -1"),
        ({"momentum": 5}, r"momentum must be a number in \(0, 1\].*got 5"),
        ({"momentum": 0.0}, r"momentum must be a number in \(0, 1\]"),
        ({"sigma_THR": math.nan}, r"sigma_THR must be a number in \[0, 1\)"),
        ({"sigma_THR": 2}, r"sigma_THR must be a number in \[0, 1\).*got 2"),
        ({"sigma_THR": 1.0}, r"sigma_THR must be a number in \[0, 1\)"),
        ({"sigma_MIN": -1.0}, "sigma_MIN must be a finite number >= 0"),
        ({"lambda_rule": "lbfgs"}, r"lambda_rule must be one of \('paper', 'official'\); got "
                                   r"'lbfgs'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegBN(4, 3, [], [], **kwargs)


def test_bad_dims():
    with pytest.raises(ValueError, match="f_num_channels and f_layer_dim must be positive ints"):
        RegBN(0, 3, [], [])
    with pytest.raises(ValueError, match="g_num_channels and g_layer_dim must be positive ints"):
        RegBN(4, 3, [], [2.5])


def test_inputs_that_are_not_float_tensors():
    layer = make((4,), (3,))
    with pytest.raises(TypeError, match="f must be a torch.Tensor; got list"):
        layer([1.0, 2.0], torch.randn(2, 3))
    with pytest.raises(TypeError, match="g must be a floating-point tensor; got dtype torch.int64"):
        layer(torch.randn(2, 4), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"f must be \(B, C, \*spatial\).*got shape \(4,\)"):
        layer(torch.randn(4), torch.randn(4, 3))


def test_meta_tensors_only_propagate_shapes():
    layer = make((4, 3), (2,))
    f_r, g_out = layer(torch.empty(5, 4, 3, device="meta"), torch.empty(5, 2, device="meta"))
    assert f_r.shape == (5, 4, 3) and g_out.shape == (5, 2)
    assert int(layer.num_batches_tracked) == 0


# ----------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["paper", "official"])
def test_cuda_matches_cpu(rule):
    fs, gs = (64,), (8, 4, 4)
    cpu = make(fs, gs, lambda_rule=rule, normalize_input=True)
    gpu = make(fs, gs, lambda_rule=rule, normalize_input=True).to("cuda")
    for seed in range(3):
        f, g = batch(16, fs, gs, seed=seed, dtype=torch.float32)
        a = cpu(f, g)
        b = gpu(f.cuda(), g.cuda())
        torch.testing.assert_close(b[0].cpu(), a[0], rtol=1e-4, atol=1e-4)
        assert gpu.last_lambda == pytest.approx(cpu.last_lambda, rel=1e-4)
    torch.testing.assert_close(gpu.W.cpu(), cpu.W, rtol=1e-4, atol=1e-5)
    cpu.eval()
    gpu.eval()
    f, g = batch(1, fs, gs, seed=5, dtype=torch.float32)
    torch.testing.assert_close(gpu(f.cuda(), g.cuda())[0].cpu(), cpu(f, g)[0], rtol=1e-4,
                               atol=1e-4)


@cuda
@pytest.mark.cuda
def test_cuda_gradcheck():
    layer = make((4,), (9,)).double().cuda()
    f, g = batch(5, (4,), (9,), seed=2, g_scale=0.5)
    f, g = f.cuda().requires_grad_(), g.cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda f, g: layer(f, g), (f, g), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


def test_a_device_without_float64_gets_float32_statistics(monkeypatch):
    """MPS has no float64: moving there turns the λ⁺ history and Adam moments into float32."""
    import regbn.layer as layer_module

    fs, gs = (6,), (9,)
    layer = make(fs, gs)
    layer(*batch(8, fs, gs, dtype=torch.float32))
    monkeypatch.setattr(layer_module, "solve_dtype", lambda device: torch.float32)
    layer.to("cpu")  # stands in for .to("mps")
    assert {layer.adam_m.dtype, layer.adam_v.dtype, layer.lambda_history.dtype} == {torch.float32}
    assert layer.W.dtype == torch.float32
    layer(*batch(8, fs, gs, seed=1, dtype=torch.float32))
    assert int(layer.num_batches_tracked) == 2 and layer.last_lambda > 0
    assert layer.adam_m.dtype == torch.float32


def test_device_mismatch_is_explained():
    layer = make((4,), (3,)).to("meta")
    with pytest.raises(ValueError, match=r"f \(cpu\) and g \(cpu\) must be on the layer's "
                                         r"device \(meta\); move the layer"):
        layer(torch.randn(2, 4), torch.randn(2, 3))


# ----------------------------------------------------------------------------- precision, overflow
# The official example's RegBN settings (mogvision/regbn, example_PMR)
OFFICIAL = dict(normalize_input=True, normalize_output=True, affine=True, sigma_THR=0.0,
                sigma_MIN=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["vector", "map2d"])
def test_half_layers_train_and_evaluate_with_the_official_options(dtype, name):
    fs, gs = LAYER_SHAPES[name]
    layer = make(fs, gs, **OFFICIAL).to(dtype)
    reference_layer = make(fs, gs, **OFFICIAL)  # float32, same (default) parameters
    f, g = batch(8, fs, gs, dtype=torch.float32)
    f, g = f.to(dtype), g.to(dtype)
    f.requires_grad_()
    f_r, g_out = layer(f, g)
    (f_r.float().square().sum() + g_out.float().sum()).backward()
    assert f_r.dtype == g_out.dtype == dtype and f.grad is not None
    assert layer.norm_f.weight.grad is not None and layer.norm_f.weight.dtype == dtype
    assert int(layer.num_batches_tracked) == 1 and layer.last_lambda > 0
    ref_r, _ = reference_layer(f.detach().float(), g.float())
    torch.testing.assert_close(f_r.float(), ref_r, rtol=0.1, atol=0.1)
    layer.eval()
    reference_layer.load_state_dict({k: v.float() if v.is_floating_point() else v
                                     for k, v in layer.state_dict().items()})
    reference_layer.eval()
    out = layer(f.detach()[:3], g[:3])[0]
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), reference_layer(f.detach()[:3].float(),
                                                            g[:3].float())[0],
                               rtol=0.05, atol=0.05)


def test_an_output_norm_failure_changes_no_buffer(monkeypatch):
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, **OFFICIAL)
    layer(*batch(8, fs, gs, dtype=torch.float32))
    before = buffers(layer)
    real = RegBN._norm

    def failing(self, norm, x, training):
        if norm is self.norm_f_out:
            raise RuntimeError("simulated output-norm failure")
        return real(self, norm, x, training)

    monkeypatch.setattr(RegBN, "_norm", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        layer(*batch(8, fs, gs, seed=1, dtype=torch.float32))
    assert_same_buffers(before, buffers(layer))


@pytest.mark.parametrize("name", ["vector", "map2d"])
def test_huge_finite_inputs_give_finite_outputs(name):
    """The output LayerNorm is scale-invariant, so 1e20·(f, g) must give what (f, g) gives; a
    float32 LayerNorm squares 1e20 into infinity (NaN outputs before)."""
    fs, gs = LAYER_SHAPES[name]
    f, g = batch(8, fs, gs, dtype=torch.float32)
    small, huge = make(fs, gs), make(fs, gs)
    a, _ = small(f, g)
    b, g_b = huge(1e20 * f, 1e20 * g)
    assert bool(torch.isfinite(b).all() and torch.isfinite(g_b).all())
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    small.eval()
    huge.eval()
    torch.testing.assert_close(huge(1e20 * f, 1e20 * g)[0], small(f, g)[0], rtol=1e-3,
                               atol=1e-3)


def test_layer_norm_matches_torch_and_survives_extremes():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(regbn.layer.layer_norm(x, (3, 5), w, b, 1e-5),
                               TF.layer_norm(x, [3, 5], w, b, 1e-5), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    for scale in (1e-30, 1e25, 3e38):
        y = regbn.layer.layer_norm(x32 / x32.abs().max() * scale, (3, 5), None, None, 1e-5)
        assert bool(torch.isfinite(y).all()), scale
    const = torch.full((2, 7), 1e30)
    assert torch.equal(regbn.layer.layer_norm(const, (7,), None, None, 1e-5), torch.zeros(2, 7))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: regbn.layer.layer_norm(t, (3, 5), w, b, 1e-5), (x,))


@pytest.mark.parametrize("scale", [1.0, 1e15, 1e25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_host_read_layer_norm_is_the_rescaled_one_bit_for_bit(scale, dtype):
    """Eager eval reads max|x| on the host and skips the rescaling when no sample needs it;
    the numbers are those of the graph form (fold, export, compile), within 2**k or beyond."""
    from regbn._checks import host_reads
    from regbn._norms import layer_norm

    x = torch.randn(6, 3, 5, dtype=dtype) * torch.tensor([1.0, scale, 1e-3] * 2,
                                                        dtype=dtype)[:, None, None]
    w, b = torch.randn(3, 5, dtype=dtype), torch.randn(3, 5, dtype=dtype)
    assert host_reads(x)
    assert torch.equal(layer_norm(x, (3, 5), w, b, 1e-5, host=True),
                       layer_norm(x, (3, 5), w, b, 1e-5))
    layer = make((5,), (3,), normalize_input=True, affine=True).to(dtype)
    layer(*batch(8, (5,), (3,), dtype=dtype))
    layer.eval()
    f, g = x[:, 0], x[:, :, 0]  # (6, 5) and (6, 3), one sample at the large scale
    specs = [regbn.layer.norm_spec(m) for m in layer._norms()]
    with torch.no_grad():
        eager = layer(f, g)
        graph = regbn.layer.eval_maths(f, g, layer.W, specs, (5,), (3,), dtype)  # as fold's
    assert torch.equal(eager[0], graph[0]) and torch.equal(eager[1], graph[1])


def test_eval_reads_nothing_on_the_host_under_a_dispatch_mode():
    """make_fx's tracing and FakeTensorMode hold no values to read: eval runs the graph form."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = make((5,), (3,), normalize_input=True, affine=True)
    f, g = batch(8, (5,), (3,))
    layer(f, g)
    layer.eval()
    with torch.no_grad():
        expected = layer(f, g)
        traced = make_fx(lambda a, b: layer(a, b), tracing_mode="real")(f, g)
        torch.testing.assert_close(traced(f, g), expected, rtol=0, atol=0)
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = layer(f, g)
    assert out[0].shape == f.shape and out[1].shape == g.shape


def test_input_statistics_that_overflow_are_rejected_without_touching_buffers():
    fs, gs = LAYER_SHAPES["map2d"]  # the input norm is a BatchNorm2d: its variance overflows
    layer = make(fs, gs, normalize_input=True)
    layer(*batch(8, fs, gs, dtype=torch.float32))
    before = buffers(layer)
    f, g = batch(8, fs, gs, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="not finite.*no buffer changed"):
        layer(1e20 * f, 1e20 * g)
    assert_same_buffers(before, buffers(layer))


# ----------------------------------------------------------------------------- resets, lazy, modes
def test_reset_running_stats_and_reset_parameters():
    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, **OFFICIAL)

    def stats(m):
        return {k: v for k, v in buffers(m).items() if k not in dict(m.named_parameters())}

    fresh = stats(make(fs, gs, **OFFICIAL))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for seed in range(2):
        f_r, g_out = layer(*batch(8, fs, gs, seed=seed, dtype=torch.float32))
        (f_r.square().sum() + g_out.square().sum()).backward()
        opt.step()
    assert not torch.equal(layer.norm_f_out.weight, torch.ones_like(layer.norm_f_out.weight))
    weight = layer.norm_f_out.weight.detach().clone()
    layer.reset_running_stats()
    assert_same_buffers(fresh, stats(layer))
    assert layer.last_lambda is None
    assert torch.equal(layer.norm_f_out.weight, weight)  # parameters untouched
    layer(*batch(8, fs, gs, dtype=torch.float32))
    layer.reset_parameters()
    assert_same_buffers(fresh, stats(layer))
    for norm in (layer.norm_f, layer.norm_g, layer.norm_f_out, layer.norm_g_out):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    RegBN().reset_parameters()  # a lazy layer has nothing to reset but must not fail


def test_a_lazy_layer_stays_lazy_after_a_rejected_first_batch():
    layer = RegBN(normalize_input=True)
    with pytest.raises(ValueError, match="at most 3 spatial dims"):
        layer(torch.randn(6, 2, 2, 2, 2, 2), torch.randn(6, 3))
    assert layer.has_uninitialized_params() and layer.f_shape is None
    assert not hasattr(layer, "norm_f") and "lazy" in repr(layer)
    f_r, _ = layer(torch.randn(6, 4), torch.randn(6, 3))
    assert layer.f_shape == (4,) and f_r.shape == (6, 4)


def test_training_after_inference_mode_works():
    fs, gs = LAYER_SHAPES["vector"]
    for layer in (make(fs, gs), RegBN()):
        with torch.inference_mode():
            layer(*batch(8, fs, gs, dtype=torch.float32))
        layer(*batch(8, fs, gs, seed=1, dtype=torch.float32))
        f = batch(8, fs, gs, seed=2, dtype=torch.float32)[0].requires_grad_()
        layer(f, batch(8, fs, gs, seed=2, dtype=torch.float32)[1])[0].sum().backward()
        assert int(layer.num_batches_tracked) == 3 and not layer.W.is_inference()


def test_state_dict_of_a_lazy_layer_saves_and_loads():
    model = torch.nn.ModuleDict({"rb": RegBN(), "lin": torch.nn.LazyLinear(3)})
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    other = torch.nn.ModuleDict({"rb": RegBN(), "lin": torch.nn.LazyLinear(3)})
    other.load_state_dict(state)
    assert other["rb"].has_uninitialized_params()
    fs, gs = LAYER_SHAPES["vector"]
    other["rb"](*batch(6, fs, gs, dtype=torch.float32))
    assert other["rb"].f_shape == fs
    with pytest.raises(RuntimeError, match="lazy RegBN that never saw a batch"):
        make(fs, gs).load_state_dict(RegBN().state_dict())


def test_an_old_dict_extra_state_still_loads():
    fs, gs = LAYER_SHAPES["map1d"]
    layer = make(fs, gs)
    state = layer.state_dict()
    state["_extra_state"] = {"f_shape": fs, "g_shape": gs}
    state._metadata[""]["version"] = 1  # as the regbn that saved dicts wrote it
    lazy = RegBN()
    lazy.load_state_dict(state)
    assert lazy.f_shape == fs and lazy.g_shape == gs


@pytest.mark.parametrize("normalize_input", [False, True])
def test_an_empty_eval_batch_gives_empty_outputs(normalize_input):
    for name in ("vector", "map2d"):
        fs, gs = LAYER_SHAPES[name]
        layer = make(fs, gs, normalize_input=normalize_input).eval()
        f_r, g_out = layer(torch.empty(0, *fs), torch.empty(0, *gs))
        assert f_r.shape == (0, *fs) and g_out.shape == (0, *gs)


# ----------------------------------------------------------------------------- autograd, torch.func
def test_second_derivatives_are_refused_in_training_and_exact_in_eval():
    fs, gs = LAYER_SHAPES["vector"]
    f, g = batch(6, fs, gs, g_scale=0.5)
    f.requires_grad_()
    g.requires_grad_()
    layer = make(fs, gs).double()
    weights = torch.randn(6, *fs, dtype=torch.float64)
    # a constant incoming gradient: once_differentiable let the Hessian-vector product through
    # without the layer's terms (norm 12.2 where finite differences give 6.0)
    with pytest.raises(RuntimeError, match="exact to first order only"):
        torch.autograd.grad((layer(f, g)[0] * weights).sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        (layer(f, g)[0] * weights).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.gradgradcheck(lambda f, g: layer(f, g)[0], (f, g))
    (gf,) = torch.autograd.grad((layer(f, g)[0] * weights).sum(), f)  # first order still fine
    assert gf.shape == f.shape
    layer.eval()
    assert torch.autograd.gradgradcheck(lambda f, g: layer(f, g), (f, g))


def test_torch_func_transforms_in_eval_and_a_clear_error_in_training():
    fs, gs = LAYER_SHAPES["map1d"]
    layer = make(fs, gs, normalize_input=True).double()
    layer(*batch(8, fs, gs))
    layer.eval()
    f, g = batch(4, fs, gs, seed=1)
    stacked = torch.stack([f, 2 * f]), torch.stack([g, -g])
    out = torch.func.vmap(lambda a, b: layer(a, b)[0])(*stacked)
    torch.testing.assert_close(out[1], layer(2 * f, -g)[0])
    grad = torch.func.grad(lambda a: layer(a, g)[0].square().sum())(f)
    x = f.clone().requires_grad_()
    layer(x, g)[0].square().sum().backward()
    torch.testing.assert_close(grad, x.grad)
    jac = torch.func.jacrev(lambda a: layer(a, g)[0])(f)
    assert jac.shape == (*f.shape, *f.shape)
    layer.train()
    for transform in (torch.func.grad, torch.func.vmap):
        with pytest.raises(ValueError, match="cannot run under torch.func transforms"):
            transform(lambda a: layer(a, g)[0].sum())(f if transform is torch.func.grad
                                                      else stacked[0])
    assert int(layer.num_batches_tracked) == 1


def test_shape_only_training_call_on_fake_tensors_changes_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    fs, gs = LAYER_SHAPES["map2d"]
    layer = make(fs, gs, normalize_input=True)
    before = buffers(layer)
    with FakeTensorMode(allow_non_fake_inputs=True):
        f_r, g_out = layer(torch.empty(5, *fs), torch.empty(5, *gs))
    assert f_r.shape == (5, *fs) and g_out.shape == (5, *gs)
    assert_same_buffers(before, buffers(layer))


def test_a_lazy_layer_deep_copies():
    layer = RegBN()
    twin = copy.deepcopy(layer)
    assert twin.has_uninitialized_params() and twin.W is not layer.W
    fs, gs = LAYER_SHAPES["vector"]
    twin(*batch(6, fs, gs, dtype=torch.float32))
    assert twin.f_shape == fs and layer.has_uninitialized_params()


def test_a_lazy_layer_refuses_fake_and_meta_first_batches():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = RegBN()
    with pytest.raises(ValueError, match="lazy layer takes its shapes.*from a first real batch"):
        layer(torch.empty(4, 3, device="meta"), torch.empty(4, 2, device="meta"))
    with FakeTensorMode(), pytest.raises(ValueError, match="lazy layer"):
        layer(torch.empty(4, 3), torch.empty(4, 2))
    assert layer.has_uninitialized_params()
    layer(torch.randn(4, 3), torch.randn(4, 2))
    assert layer.f_shape == (3,) and not layer.W.is_meta


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) as one row of C channels per sample and position."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_projection_solves_over_positions_and_evaluates_per_position(dtype):
    torch.manual_seed(0)
    layer = RegBN(4, 3, [5, 5], [5, 5], normalize_output=False, projection="channel").to(dtype)
    assert layer.W.shape == (3, 4) and "projection='channel'" in repr(layer)
    f, g = torch.randn(6, 4, 5, 5, dtype=dtype), torch.randn(6, 3, 5, 5, dtype=dtype) * 0.1
    f_r, g_out = layer(f, g)
    ref = reference(_rows(f), _rows(g))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(_rows(f_r).double(), ref.f_r, atol=tol, rtol=tol)
    assert f_r.shape == f.shape and torch.equal(g_out, g)
    for _ in range(3):
        layer(torch.randn(6, 4, 5, 5, dtype=dtype), torch.randn(6, 3, 5, 5, dtype=dtype))
    layer.eval()
    fe, ge = torch.randn(1, 4, 5, 5, dtype=dtype), torch.randn(1, 3, 5, 5, dtype=dtype)
    want = (_rows(fe) - _rows(ge) @ layer.W).reshape(1, 5, 5, 4).movedim(-1, 1)
    # Not bit for bit: eval runs one addmm(f, g, W, alpha=-1), this check a matmul and then a
    # subtraction, two kernels whose rounding follows the CPU's BLAS path. Each lies within
    # (Cg + 1)/2 = 2 ulps of |f| + |g|·|W| of the exact f − g W, so they agree within 4 ulps.
    scale = float((_rows(fe).abs() + _rows(ge).abs() @ layer.W.abs()).max())
    torch.testing.assert_close(layer(fe, ge)[0], want, atol=4 * torch.finfo(dtype).eps * scale,
                               rtol=0)
    # a lazy layer takes W's (Cg, Cf) shape from a checkpoint and reproduces eval bit for bit:
    # the same eval kernels run on the same W and the same inputs
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    lazy = RegBN(normalize_output=False, projection="channel")
    lazy.load_state_dict(torch.load(buf))
    assert torch.equal(lazy.eval()(fe, ge)[0], layer(fe, ge)[0])


def test_channel_projection_gradients_and_refusals():
    layer = RegBN(2, 3, [3, 3], [3, 3], normalize_input=True, affine=True, projection="channel")
    layer = layer.double()
    f = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, is_training=True)[0], (f, g))
    with pytest.raises(ValueError, match=r"same spatial size; got f \(4, 5, 5\) and g \(3, 4, 4\)"):
        RegBN(4, 3, [5, 5], [4, 4], projection="channel")
    with pytest.raises(ValueError, match="projection must be one of"):
        RegBN(4, 3, [], [], projection="chan")
    lazy = RegBN(projection="channel")
    lazy(torch.randn(4, 8, 3, 3), torch.randn(4, 2, 3, 3))
    assert lazy.W.shape == (2, 8)
    # vectors: one W either way
    a, b = RegBN(4, 3, projection="channel"), RegBN(4, 3)
    f, g = torch.randn(8, 4), torch.randn(8, 3)
    torch.testing.assert_close(a(f, g)[0], b(f, g)[0])


@pytest.mark.slow
def test_compiled_training_updates_the_running_state_like_eager():
    # torch.compile treats a 0-dim float64 CPU tensor as a Python float and dropped in-place
    # updates of the Adam moments: the running W drifted from eager's without any error.
    torch.manual_seed(0)
    layer = RegBN(5, 4, [], [])
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager")
    for _ in range(3):
        f, g = torch.randn(8, 5), torch.randn(8, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # graph breaks at the solve
            got = compiled(f, g)
        want = eager(f, g)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name, buf in eager.state_dict().items():
        mine = layer.state_dict()[name]
        torch.testing.assert_close(mine, buf, atol=1e-7, rtol=0, equal_nan=True, msg=name)
    assert layer.adam_m.shape == () and layer.adam_m.dtype == torch.float64


# ----------------------------------------------------------------------------- signature, refusals
def test_the_official_constructor_keywords_and_positional_forward():
    # the keyword set the official example (mogvision/regbn) passes, gpu included
    official = dict(gpu=0, f_num_channels=128, g_num_channels=16, f_layer_dim=[], g_layer_dim=[],
                    normalize_input=True, normalize_output=True, affine=False)
    with pytest.warns(UserWarning):
        layer = RegBN(**official)
    f, g = torch.randn(8, 128), torch.randn(8, 16)
    f_r, g_out = layer(f, g, is_training=True, n_epoch=1)
    assert f_r.shape == f.shape and g_out.shape == g.shape
    f_r, g_out = layer(f, g, True, 3, 100)  # the official forward's positional order
    assert torch.isfinite(f_r).all() and torch.isfinite(g_out).all()
    assert int(layer.num_batches_tracked) == 2


def test_signature_order_and_defaults():
    import inspect

    sig = inspect.signature(RegBN)
    defaults = dict(f_num_channels=None, g_num_channels=None, f_layer_dim=None, g_layer_dim=None,
                    gpu=None, beta1=0.9, beta2=0.99, momentum=0.02, normalize_input=False,
                    normalize_output=True, affine=False, sigma_THR=0.0, sigma_MIN=0.0,
                    verbose=False)
    assert list(sig.parameters)[: len(defaults)] == list(defaults)
    for name, value in defaults.items():
        assert sig.parameters[name].default == value, name
    assert sig.parameters["lambda_rule"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["lambda_rule"].default == "paper"
    assert sig.parameters["max_projection_bytes"].default == 2**30


@pytest.mark.parametrize("spatial,kind", [((4, 5), torch.nn.BatchNorm2d),
                                          ((2, 3, 2), torch.nn.BatchNorm3d),
                                          ((6,), torch.nn.LayerNorm), ((), torch.nn.LayerNorm)])
def test_input_norm_kind_follows_the_number_of_spatial_dims(spatial, kind):
    layer = RegBN(3, 2, list(spatial), [], normalize_input=True)
    assert type(layer.norm_f) is kind


@pytest.mark.parametrize("case", ["batch", "shape", "one", "bytes"])
def test_a_refused_call_changes_no_buffer(case):
    fs, gs = (4,), (3, 2)
    layer = make(fs, gs, normalize_input=True)
    layer(*batch(5, fs, gs, dtype=torch.float32))
    before = buffers(layer)
    with pytest.raises(ValueError):
        if case == "batch":
            layer(torch.randn(5, 4), torch.randn(6, 3, 2))
        elif case == "shape":
            layer(torch.randn(5, 4), torch.randn(5, 3, 7))
        elif case == "one":
            layer(torch.randn(1, 4), torch.randn(1, 3, 2), is_training=True)
        else:  # a lazy layer whose first batch needs a W past the limit
            RegBN(max_projection_bytes=1000)(torch.randn(5, 100), torch.randn(5, 10))
    assert_same_buffers(before, buffers(layer))


def test_a_lazy_layer_with_input_norms_reproduces_a_checkpoint_bit_for_bit():
    fs, gs = (4,), (3, 2)
    layer = make(fs, gs, normalize_input=True)
    for seed in range(3):
        layer(*batch(6, fs, gs, seed=seed, dtype=torch.float32))
    layer.eval()
    lazy = RegBN(normalize_input=True)
    lazy.load_state_dict(layer.state_dict())
    lazy.eval()
    f, g = batch(3, fs, gs, seed=9, dtype=torch.float32)
    a, b = layer(f, g), lazy(f, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert lazy.last_lambda == layer.last_lambda


def test_resuming_from_a_checkpoint_continues_training_bit_for_bit():
    fs, gs = (4,), (3, 2)
    xs = [batch(5, fs, gs, seed=s, dtype=torch.float32) for s in range(3)]
    a = make(fs, gs, normalize_input=True)
    a(*xs[0])
    a(*xs[1])
    checkpoint = copy.deepcopy(a.state_dict())
    a(*xs[2])
    b = make(fs, gs, normalize_input=True)
    b.load_state_dict(checkpoint)
    b(*xs[2])
    assert torch.equal(a.W, b.W) and a.last_lambda == b.last_lambda
    assert_same_buffers(buffers(a), buffers(b))


def test_a_float64_lazy_layer_keeps_float64():
    layer = RegBN()
    f_r, g_out = layer(*batch(6, (4,), (3,)))
    assert f_r.dtype == g_out.dtype == layer.W.dtype == torch.float64
    layer.eval()
    assert layer(*batch(1, (4,), (3,), seed=1))[0].dtype == torch.float64


def test_float32_inputs_under_autocast_give_the_result_without_it():
    fs, gs = (6,), (5,)
    f, g = batch(8, fs, gs, dtype=torch.float32)
    plain, autocast = make(fs, gs), make(fs, gs)
    want, _ = plain(3 * f, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = autocast(3 * f, g)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    assert autocast.last_lambda == pytest.approx(plain.last_lambda, rel=1e-4)
    assert autocast.W.dtype == torch.float32
    lazy = RegBN()  # a lazy layer's first batch in bfloat16, as autocast produces it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lazy(3 * f.bfloat16(), g.bfloat16())
    assert bool(torch.isfinite(out).all()) and lazy.W.dtype == torch.float32


def test_n_epoch_has_no_effect_and_an_eval_step_keeps_the_batchnorm_statistics():
    fs, gs = (2, 3, 3), (3,)
    a = make(fs, gs, normalize_input=True)
    b = make(fs, gs, normalize_input=True)
    for seed in range(3):
        x = batch(5, fs, gs, seed=seed, dtype=torch.float32)
        a(*x, is_training=True, n_epoch=1)
        b(*x, is_training=True, n_epoch=7, steps_per_epoch=3)
    assert torch.equal(a.W, b.W)
    before = buffers(a)  # the input BatchNorm2d's running statistics included
    a(*batch(4, fs, gs, seed=5, dtype=torch.float32), is_training=False)  # a train-mode layer
    assert_same_buffers(before, buffers(a))


def test_verbose_reports_each_training_batch_through_logging(caplog, capsys):
    layer = RegBN(5, 4, [], [], verbose=True)
    f, g = torch.randn(8, 5), torch.randn(8, 4)
    with caplog.at_level("INFO", logger="regbn"):
        layer(f, g)
    records = [r for r in caplog.records if r.name.startswith("regbn")]
    assert len(records) == 1 and "lambda+=" in records[0].getMessage()
    assert f"{layer.last_lambda:.6g}" in records[0].getMessage()
    assert capsys.readouterr().out == ""  # nothing printed
    caplog.clear()
    layer.eval()
    layer(f, g)
    assert not caplog.records  # eval mode solves nothing


def test_a_profiled_training_step_labels_its_phases():
    from regbn._phases import PHASES

    layer = RegBN(6, 9, [], [], normalize_input=True)
    f, g = torch.randn(8, 6, requires_grad=True), torch.randn(8, 9)
    with torch.profiler.profile() as prof:
        layer(f, g)[0].sum().backward()
    names = {e.name for e in prof.events()}
    assert {f"regbn.{p}" for p in PHASES} <= names


def test_channel_projection_with_the_official_lambda_rule_trains_and_checkpoints():
    torch.manual_seed(0)
    layer = RegBN(4, 3, [5, 5], [5, 5], projection="channel", lambda_rule="official")
    f = torch.randn(6, 4, 5, 5, requires_grad=True)
    g = torch.randn(6, 3, 5, 5, requires_grad=True)
    f_r, g_out = layer(f, g)
    (f_r.square().sum() + g_out.sum()).backward()
    assert layer.last_lambda is not None and math.isfinite(layer.last_lambda)
    assert f.grad is not None and torch.isfinite(f.grad).all()
    assert int(layer.num_batches_tracked) == 1 and layer.W.abs().sum() > 0
    # The checkpoint holds the channel W (Cg×Cf), the feature shapes and the projection: a
    # channel layer (even a lazy one) reloads it and evaluates bit for bit, a full layer refuses
    # it by name, before touching a buffer.
    state = layer.state_dict()
    assert state["W"].shape == (3, 4)
    # shapes, projection 1 (channel), options 2 (normalize_output only)
    assert state["_extra_state"].tolist() == [3, 4, 5, 5, 3, 3, 5, 5, 1, 2]
    lazy = RegBN(projection="channel", lambda_rule="official")
    lazy.load_state_dict(state)
    fe, ge = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5)
    assert torch.equal(lazy.eval()(fe, ge)[0], layer.eval()(fe, ge)[0])
    full = RegBN(4, 3, [5, 5], [5, 5], lambda_rule="official")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    with pytest.raises(ValueError, match="saved with projection='channel'.*projection='full'"):
        full.load_state_dict(state)
    after = full.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
    # A layer that never trained records its projection too.
    lazy_state = RegBN(projection="channel").state_dict()
    with pytest.raises(regbn.RegBNError, match="saved with projection='channel'"):
        RegBN().load_state_dict(lazy_state)
    RegBN(projection="channel").load_state_dict(lazy_state)
    # Checkpoints written before the options, or the projection, were recorded still load.
    for cut in (1, 2):
        old = dict(state)
        old["_extra_state"] = state["_extra_state"][:-cut]
        RegBN(projection="channel", lambda_rule="official").load_state_dict(old)


@pytest.mark.parametrize("option", ["normalize_output", "normalize_input", "affine"])
def test_eval_options_travel_with_the_state(option):
    """A checkpoint loads only into a layer that computes the same in eval: a different
    normalize_input, normalize_output or affine is refused by name, before any buffer changes;
    training-only options (lambda_rule, momentum) may differ, to fine-tune with new settings."""
    torch.manual_seed(0)
    saved = RegBN(6, 4, [], [])
    saved(torch.randn(16, 6), torch.randn(16, 4))
    state = saved.state_dict()
    other = RegBN(6, 4, [], [], **{option: not getattr(saved, option)})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    mine, theirs = getattr(other, option), getattr(saved, option)
    with pytest.raises(ValueError, match=rf"saved with {option}={theirs} but this layer has "
                       rf"{option}={mine}; build it with RegBN\(\.\.\., {option}={theirs}\)"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert_same_buffers(before, after)
    tuned = RegBN(6, 4, [], [], lambda_rule="official", momentum=0.5)
    tuned.load_state_dict(state)
    x = (torch.randn(5, 6), torch.randn(5, 4))
    assert torch.equal(tuned.eval()(*x)[0], saved.eval()(*x)[0])


# ----------------------------------------------------------------------------- host reads
class _HostReads:
    """Counts the reads of tensor data on the host (what is a synchronisation on an
    accelerator): item, tolist, bool/float/int/index of a tensor, and numpy."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(real))

    def _counted(self, real):
        def wrapper(t, *args, **kwargs):
            self.count += 1
            return real(t, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize(
    "options",
    [{}, {"normalize_input": True, "normalize_output": True, "affine": True}],
    ids=["default", "official"],
)
@pytest.mark.parametrize(
    "shapes",
    [((512,), (64, 7, 7), 16), ((1, 28, 28), (3, 28, 28), 16), ((128,), (16,), 40)],
    ids=["readme", "pmr", "primal"],
)
def test_a_training_step_reads_the_host_once(monkeypatch, shapes, options, rule):
    """The success path of a training step (forward and backward, after the first) reads
    tensor data on the host once: the spectrum, with every check fused into that read."""
    fs, gs, B = shapes
    torch.manual_seed(0)
    layer = make(fs, gs, lambda_rule=rule, **options)
    f, g = batch(B, fs, gs, dtype=torch.float32)
    f.requires_grad_()
    layer(f, g)[0].sum().backward()
    counter = _HostReads(monkeypatch)
    for seed in (1, 2, 3):
        before = counter.count
        f, g = batch(B, fs, gs, seed=seed, dtype=torch.float32)
        f.requires_grad_()
        f_r, g_out = layer(f, g)
        (f_r.sum() + g_out.sum()).backward()
        assert counter.count - before <= 1, counter.count - before
    assert counter.count > 0  # the counter sees the one read
    monkeypatch.undo()
    assert int(layer.num_batches_tracked) == 4 and math.isfinite(layer.last_lambda)


def test_finite_inputs_whose_sum_overflows_are_solved():
    """Finite float32 inputs near 1e37 sum past float32's range: the fused checks' sum reads
    as non-finite, yet the batch is solved as without them (and matches the reference)."""
    layer = RegBN(12, 20, normalize_output=False)
    f, g = batch(8, (12,), (20,), seed=3, dtype=torch.float32)
    f, g = f.abs() * 3e37, g * 1e37
    assert not math.isfinite(float(f.sum()))
    f_r, _ = layer(f, g)
    ref = reference(f, g)
    assert int(layer.num_batches_tracked) == 1
    assert layer.last_lambda == pytest.approx(ref.lam, rel=1e-5)
    assert float((f_r.double() - ref.f_r).norm() / ref.f_r.norm()) < 1e-5


def test_float64_layer_refuses_a_float32_residual_that_overflows():
    """A float64 layer fed float32 inputs computes f_r in float32: a residual past float32's
    range is refused, no buffer changed (W's wider range proves nothing about f_r)."""
    f = torch.tensor([[3e38, -3e38], [-3e38, 3e38], [-3e38, 3e38]], dtype=torch.float32)
    g = torch.tensor([[1e38, -1e38, 0.0]] * 3, dtype=torch.float32)
    layer = RegBN(2, 3, normalize_output=False).double()
    before = buffers(layer)
    with pytest.raises(ValueError, match="not finite"):
        layer(f, g)
    assert_same_buffers(before, buffers(layer))


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_a_huge_w_written_behind_autograd_is_refused_not_turned_into_nan(write):
    """Writes that bypass the version counter (W.data, a NumPy view) are seen by the next step."""
    torch.manual_seed(0)
    layer = RegBN(5, 4, normalize_output=False)
    layer(torch.randn(8, 5), torch.randn(8, 4))
    if write == "data":
        layer.W.data.fill_(3.3e38)
    else:
        layer.W.numpy()[...] = 3.3e38
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="RegBN: "):
        layer(torch.randn(8, 5), torch.randn(8, 4))
    after = layer.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)

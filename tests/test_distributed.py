"""regbn.convert_sync_regbn: two gloo ranks equal one process holding the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import regbn
from regbn import RegBN, convert_sync_regbn
from regbn.distributed import SyncRegBN

FS, GS = (2, 3, 3), (3, 2, 2)  # 2D maps: the input normalisation is a BatchNorm2d
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(sizes: list[int], step: int):
    gen = torch.Generator().manual_seed(100 + step)
    B = sum(sizes)
    f = torch.randn(B, *FS, generator=gen, dtype=torch.float64)
    g = 0.5 * torch.randn(B, *GS, generator=gen, dtype=torch.float64)
    wf = torch.randn(B, *FS, generator=gen, dtype=torch.float64)
    wg = torch.randn(B, *GS, generator=gen, dtype=torch.float64)
    return f, g, wf, wg


def _layer() -> RegBN:
    return RegBN(FS[0], GS[0], list(FS[1:]), list(GS[1:]), normalize_input=True,
                 affine=True).double()


def _run(layer: nn.Module, sizes: list[int], rows: slice) -> dict:
    """STEPS training steps on ``rows`` of each global batch; what a rank sees and computes."""
    out: dict = {"f_r": [], "g_out": [], "gf": [], "gg": [], "lam": []}
    for step in range(STEPS):
        f, g, wf, wg = _data(sizes, step)
        f = f[rows].clone().requires_grad_()
        g = g[rows].clone().requires_grad_()
        f_r, g_out = layer(f, g)
        ((f_r * wf[rows]).sum() + (g_out * wg[rows]).sum()).backward()
        for k, v in (("f_r", f_r), ("g_out", g_out), ("gf", f.grad), ("gg", g.grad)):
            out[k].append(v.detach())
        out["lam"].append(layer.last_lambda)
    out["state"] = {k: v.clone() for k, v in layer.state_dict().items()
                    if isinstance(v, torch.Tensor)}
    out["param_grads"] = {k: p.grad.clone() for k, p in layer.named_parameters()}
    return out


def _worker(rank: int, world: int, port: int, sizes: list[int], tmp: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        layer = convert_sync_regbn(_layer())
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        if mode == "equal":
            torch.save(_run(layer, sizes, rows), os.path.join(tmp, f"rank{rank}.pt"))
        elif mode == "empty":
            f, g, _, _ = _data([max(sizes), 1], 0)
            n = sizes[rank]
            try:
                layer(f[:n], g[:n])
                result = "no error"
            except ValueError as e:
                result = str(e)
            torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        elif mode == "shape":
            f, g, _, _ = _data(sizes, 0)
            if rank == 1:
                g = g[:, :, :1]  # a feature shape the layer was not built for
            try:
                layer(f, g)
                result = "no error"
            except ValueError as e:
                result = str(e)
            torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        elif mode == "crash" and rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        elif mode == "crash":
            f, g, _, _ = _data(sizes, 0)
            layer(f, g)  # waits for rank 1, which never comes: the timeout must end it
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _spawn(sizes: list[int], tmp, mode: str, timeout: float = 120.0):
    ctx = mp.start_processes(_worker, args=(2, _free_port(), sizes, str(tmp), mode), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout}s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[4, 4], [5, 2]], ids=["even", "uneven"])
def test_two_ranks_equal_one_process(tmp_path, sizes):
    ranks = _spawn(sizes, tmp_path, "equal")
    single = _run(_layer(), sizes, slice(0, sum(sizes)))
    B0 = sizes[0]
    for step in range(STEPS):
        for key in ("f_r", "g_out", "gf", "gg"):
            joined = torch.cat([ranks[0][key][step], ranks[1][key][step]])
            torch.testing.assert_close(joined, single[key][step], rtol=1e-10, atol=1e-12,
                                       msg=f"{key} at step {step}")
        assert ranks[0]["lam"][step] == pytest.approx(single["lam"][step], rel=1e-12)
        assert ranks[1]["lam"][step] == ranks[0]["lam"][step]
    for k, v in single["state"].items():  # running W, Adam moments, BatchNorm statistics
        for r in range(2):
            torch.testing.assert_close(ranks[r]["state"][k], v, rtol=1e-10, atol=1e-12,
                                       equal_nan=True, msg=k)
    # the affine norms' gradients, summed over ranks as DDP would, equal the single process's
    for k, v in single["param_grads"].items():
        torch.testing.assert_close(ranks[0]["param_grads"][k] + ranks[1]["param_grads"][k], v,
                                   rtol=1e-9, atol=1e-11, msg=k)
    assert B0 == ranks[0]["f_r"][0].shape[0]


@pytest.mark.slow
def test_an_empty_batch_on_one_rank_is_an_error_everywhere(tmp_path):
    messages = _spawn([3, 0], tmp_path, "empty")
    for m in messages:
        assert "rank(s) [1] passed an empty training batch" in m and "drop_last=True" in m


@pytest.mark.slow
def test_a_shape_error_on_one_rank_is_the_same_error_everywhere(tmp_path):
    start = time.monotonic()
    messages = _spawn([3, 3], tmp_path, "shape", timeout=60)
    assert messages[0] == messages[1]
    assert "refused on rank(s) [1]" in messages[0]
    assert r"rank 1: RegBN: g must have shape (B, 3, 2, 2)" in messages[0]
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_failing_rank_fails_the_test_promptly(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails on purpose|terminated|Connection closed"):
        _spawn([3, 3], tmp_path, "crash", timeout=90)
    assert time.monotonic() - start < 90


def test_without_a_process_group_sync_is_plain_regbn():
    base = _layer()
    sync = convert_sync_regbn(_layer())
    assert isinstance(sync, SyncRegBN)
    f, g, _, _ = _data([6], 0)
    a, b = base(f, g), sync(f, g)
    # exact: with no process group SyncRegBN gathers nothing and runs RegBN's own training step
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(base.W, sync.W)


class _TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(3, 5)
        self.norm = RegBN(6, 5, [], [])
        self.head = nn.Linear(11, 2)

    def forward(self, x, y):
        fa, fb = self.norm(self.a(x), self.b(y))
        return self.head(torch.cat([fa, fb], 1))


def test_conversion_shares_state_and_keeps_the_model_working():
    model = _TwoBranch()
    W_before = model.norm.W
    converted = convert_sync_regbn(model)
    assert isinstance(converted.norm, SyncRegBN)
    assert converted.norm.W is W_before
    assert set(converted.state_dict()) == set(_TwoBranch().state_dict())
    converted(torch.randn(4, 4), torch.randn(4, 3)).sum().backward()
    assert converted.a.weight.grad is not None


def test_conversion_of_a_patched_model():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(3, 5)
            self.head = nn.Linear(11, 2)

        def forward(self, x, y):
            return self.head(torch.cat([self.a(x), self.b(y)], 1))

    x, y = torch.randn(6, 4), torch.randn(6, 3)
    patched = regbn.insert(Plain(), pairs=[("a", "b")], example_inputs=(x, y))
    expected = patched(x, y)
    converted = convert_sync_regbn(patched)
    assert isinstance(converted.get_submodule("regbn_0"), SyncRegBN)
    converted.eval()
    patched.eval()
    torch.testing.assert_close(converted(x, y), patched(x, y))
    assert expected.shape == (6, 2)


def test_converting_a_trained_model_keeps_every_buffer_and_other_modules():
    model = nn.ModuleDict({"a": RegBN(4, 3, [], []), "lin": nn.Linear(2, 2)})
    model["a"](torch.randn(5, 4), torch.randn(5, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_regbn(model)
    assert isinstance(converted["a"], RegBN) and type(converted["lin"]) is nn.Linear
    after = converted.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    converted.eval()
    assert converted["a"](torch.randn(2, 4), torch.randn(2, 3))[0].shape == (2, 4)
    assert isinstance(convert_sync_regbn(RegBN(), process_group=None), RegBN)  # a lazy layer


def test_conversion_keeps_a_channel_projection_and_its_state():
    model = nn.ModuleDict(
        {"n": RegBN(4, 3, [5, 5], [5, 5], projection="channel", lambda_rule="official")}
    )
    model["n"](torch.randn(6, 4, 5, 5), torch.randn(6, 3, 5, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_regbn(model)
    layer = converted["n"]
    assert isinstance(layer, SyncRegBN)
    assert (layer.projection, layer.lambda_rule) == ("channel", "official")
    assert layer.W.shape == (3, 4)  # Cg×Cf, not (3·25)×(4·25)
    after = converted.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    # Without a process group it trains and evaluates as the channel layer it came from.
    plain = RegBN(4, 3, [5, 5], [5, 5], projection="channel", lambda_rule="official")
    plain.load_state_dict({k.removeprefix("n."): v for k, v in before.items()})
    f, g = torch.randn(6, 4, 5, 5), torch.randn(6, 3, 5, 5)
    # exact: no process group, so both run RegBN's own training step on equal state and inputs
    torch.testing.assert_close(layer(f, g)[0], plain(f, g)[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.W, plain.W, rtol=0, atol=0)

"""RegBN checkpoints of every saved format load into the current layer (tests/data/checkpoints,
written by the commits that wrote each format; see make.py there), and the current one
round-trips."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

import regbn
from regbn import RegBN

DATA = Path(__file__).parent / "data" / "checkpoints"
TRAINED = sorted(p.name for p in DATA.glob("*.pt") if not p.name.endswith("-lazy.pt"))
LAZY = sorted(p.name for p in DATA.glob("*-lazy.pt"))


def read(name: str) -> dict:
    # Our own files; a lazy checkpoint's uninitialised W needs the full unpickler.
    return torch.load(DATA / name, weights_only=False)


def version(state) -> int | None:
    return state._metadata[""].get("version")


def test_every_format_is_kept():
    prefixes = {name.rsplit("-", 1)[0] for name in TRAINED + LAZY}
    assert prefixes == {"v1-dict", "v1-shapes", "v1-projection", "v1-options", "v2"}
    assert RegBN._version == 2
    for name in TRAINED + LAZY:
        expected = int(name[1])
        assert version(read(name)["state_dict"]) == expected, name


@pytest.mark.parametrize("lazy", [False, True], ids=["built", "lazy"])
@pytest.mark.parametrize("name", TRAINED)
def test_a_saved_checkpoint_reproduces_its_eval_output(name, lazy):
    saved = read(name)
    if lazy:
        # The shapes and W come from the checkpoint; the norms are built in the default dtype,
        # as a first batch builds them, so the float64 values are loaded again once doubled.
        layer = RegBN(**saved["kwargs"])
        layer.load_state_dict(saved["state_dict"])
        args = saved["args"]
        assert layer.f_shape == (args[0], *args[2]) and layer.g_shape == (args[1], *args[3])
        assert torch.equal(layer.W, saved["state_dict"]["W"])
    else:
        layer = RegBN(*saved["args"], **saved["kwargs"])
    layer.double().load_state_dict(saved["state_dict"])
    f_r, g_out = layer.eval()(*saved["input"])
    want_f, want_g = saved["eval_output"]
    torch.testing.assert_close(f_r, want_f, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_out, want_g, rtol=0, atol=1e-12)
    for key, value in saved["state_dict"].items():
        if isinstance(value, torch.Tensor) and key != "_extra_state":
            mine = layer.state_dict()[key].to(value.dtype)
            torch.testing.assert_close(mine, value, rtol=0, atol=0, equal_nan=True, msg=key)
    # Saved again, it is the current version and round-trips.
    state = layer.state_dict()
    assert version(state) == RegBN._version
    again = RegBN(*saved["args"], **saved["kwargs"]).double()
    again.load_state_dict(state)
    assert again.last_lambda == layer.last_lambda
    assert torch.equal(again.eval()(*saved["input"])[0], f_r)


@pytest.mark.parametrize("name", TRAINED)
def test_a_saved_checkpoint_refuses_other_eval_options(name):
    saved = read(name)
    other = RegBN(*saved["args"], **{**saved["kwargs"], "normalize_output": False})
    if name.startswith("v1-") and not name.startswith("v1-options"):
        # Saved before the options were recorded: nothing to check them against; the output
        # norms' parameters have no place in this layer.
        with pytest.raises(RuntimeError, match="Unexpected key"):
            other.load_state_dict(saved["state_dict"])
        return
    with pytest.raises(regbn.RegBNValueError, match="saved with normalize_output=True"):
        other.load_state_dict(saved["state_dict"])


@pytest.mark.parametrize("name", LAZY)
def test_a_saved_lazy_checkpoint_loads_into_a_lazy_layer(name):
    saved = read(name)
    layer = RegBN(**saved["kwargs"])
    layer.load_state_dict(saved["state_dict"])
    assert layer.has_uninitialized_params()
    f, g = torch.randn(6, 4), torch.randn(6, 3)
    layer(f, g)
    assert layer.f_shape == (4,) and layer.g_shape == (3,)
    with pytest.raises(RuntimeError, match="lazy RegBN that never saw a batch"):
        RegBN(4, 3, [], []).load_state_dict(saved["state_dict"])


def test_the_current_version_is_in_the_metadata_and_round_trips():
    torch.manual_seed(0)
    layer = RegBN(4, 3, [], [])
    for _ in range(3):
        layer(torch.randn(8, 4), torch.randn(8, 3))
    state = layer.state_dict()
    assert state._metadata[""]["version"] == RegBN._version
    model = torch.nn.Sequential(torch.nn.Identity(), RegBN())
    assert model.state_dict()._metadata["1"]["version"] == RegBN._version
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = RegBN()
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 4), torch.randn(5, 3)
    assert torch.equal(fresh.eval()(*x)[0], layer.eval()(*x)[0])


def with_extra_state(state, extra):
    """A copy of ``state`` with this extra state and its own copy of the metadata (version 2)."""
    out = type(state)({**state, "_extra_state": extra})
    out._metadata = copy.deepcopy(state._metadata)
    return out


def test_the_current_version_is_read_strictly():
    layer = RegBN(4, 3, [], [])
    state = layer.state_dict()
    for bad in ({"f_shape": (4,), "g_shape": (3,)}, state["_extra_state"][:-1],
                state["_extra_state"].float(), torch.tensor([1, 4, 1, 3, 5, 2])):
        broken = with_extra_state(state, bad)
        with pytest.raises(regbn.RegBNValueError, match="version 2.*loads under version 1"):
            RegBN(4, 3, [], []).load_state_dict(broken)
        # The same extra state, marked as written by an older regbn, reads as before.
        if isinstance(bad, dict) or bad.dtype == torch.long and len(bad) < 6:
            broken._metadata[""]["version"] = 1
            RegBN(4, 3, [], []).load_state_dict(broken)


def test_a_newer_version_is_refused():
    state = RegBN(4, 3, [], []).state_dict()
    state._metadata[""]["version"] = RegBN._version + 1
    with pytest.raises(regbn.RegBNValueError, match="version 3.*upgrade regbn"):
        RegBN(4, 3, [], []).load_state_dict(state)


def test_a_state_dict_without_metadata_still_loads():
    # dict(state) drops torch's metadata, and with it the version: read as version 1.
    layer = RegBN(4, 3, [], [], projection="full")
    layer(torch.randn(8, 4), torch.randn(8, 3))
    fresh = RegBN()
    fresh.load_state_dict(dict(layer.state_dict()))
    assert torch.equal(fresh.W, layer.W)
    with pytest.raises(regbn.RegBNValueError, match="normalize_output=True"):
        RegBN(normalize_output=False).load_state_dict(dict(layer.state_dict()))

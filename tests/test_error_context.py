"""An error's context is added once, at the public entry (`regbn.errors.public`)."""

from __future__ import annotations

import warnings

import pytest
import torch

from regbn import errors
from regbn.errors import RegBNValueError, RegBNWarning, context, public


def _warn_below() -> None:
    warnings.warn("the branches may fuse inside", RegBNWarning, stacklevel=1)


# A warning of torch's raised from a line of regbn's own file is still torch's.
_torch_warns_in_regbn = eval(
    compile('lambda: warnings.warn("torch at a regbn line", UserWarning, stacklevel=1)',
            errors.__file__, "eval"),
    {"warnings": warnings},
)


@public
def insert() -> None:
    raise RegBNValueError("pair 0: 'x' is not a tensor of this model")


@public(name="regbn.fx.trace")
def trace() -> None:
    raise RegBNValueError("regbn.inspect: already says who refused")


@public
def inspect() -> None:
    raise RegBNValueError("RegBN: the layer's own words")


def test_the_entry_names_itself_once():
    with pytest.raises(RegBNValueError, match=r"^regbn\.insert: pair 0: 'x' is not") as info:
        insert()
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_message_that_names_who_refused_is_left_as_it_is():
    with pytest.raises(RegBNValueError, match=r"^regbn\.inspect: already"):
        trace()
    with pytest.raises(RegBNValueError, match=r"^RegBN: the layer"):
        inspect()


@public(name="regbn.outer")
def outer() -> None:
    insert()  # another entry, called from inside this one


def test_an_entry_called_by_another_adds_nothing():
    with pytest.raises(RegBNValueError, match=r"^regbn\.outer: pair 0: 'x' is not") as info:
        outer()
    assert "regbn.insert" not in str(info.value)


def test_context_names_the_item_and_the_entry_names_the_call():
    @public(name="regbn.pairs")
    def pairs() -> None:
        for i in range(2):
            with context(f"pair {i}"):
                if i == 1:
                    raise RegBNValueError("'y' is not a tensor")

    with pytest.raises(RegBNValueError, match=r"^regbn\.pairs: pair 1: 'y' is not a tensor$"):
        pairs()


@public(name="regbn.warns")
def warns() -> None:
    _warn_below()  # regbn's own warning, issued deeper than the entry
    warnings.warn("torch's own words", UserWarning, stacklevel=1)
    _torch_warns_in_regbn()


def test_regbn_warnings_name_the_entry_and_are_shown_at_the_callers_line():
    with pytest.warns(UserWarning) as record:
        warns()
    texts = [str(w.message) for w in record]
    assert texts == ["regbn.warns: the branches may fuse inside", "torch's own words",
                     "torch at a regbn line"]
    assert [w.category for w in record] == [RegBNWarning, UserWarning, UserWarning]
    assert {w.filename for w in record} == {__file__}


def test_a_real_entry_names_its_warnings():
    import regbn

    class Chatty(torch.nn.Module):
        def forward(self, a, b):
            print("fusing")
            return torch.cat([a, b], 1)

    for entry in (regbn.find_fusions, regbn.inspect):
        with pytest.warns(UserWarning, match=rf"^regbn\.{entry.__name__}: the model's forward "
                          "prints") as record:
            entry(Chatty(), (torch.randn(2, 3), torch.randn(2, 2)))
        assert {w.filename for w in record} == {__file__}

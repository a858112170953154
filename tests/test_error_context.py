"""An error's context is added once, at the public entry (`regbn.errors.public`)."""

from __future__ import annotations

import pytest

from regbn.errors import RegBNValueError, public


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

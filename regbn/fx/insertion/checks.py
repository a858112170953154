"""What `regbn.insert` checks and says about its arguments before any tracing.

`check_regbn_kwargs` refuses a keyword that is neither insert's own nor a `regbn.RegBN`
argument; `unwrapped` takes the model out of ``torch.compile``/``DataParallel`` with a warning
to wrap the result again; `warn_existing_layers` names RegBN layers the model already holds;
`var_args_hint` explains how to patch a ``forward(*args)``/``forward(**kwargs)`` model.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from ...errors import RegBNTypeError, RegBNWarning
from ...layer import RegBN
from ..tracing.capture import unwrap

__all__ = ["check_regbn_kwargs", "unwrapped", "var_args_hint", "warn_existing_layers"]

# Set by insert from the inferred shapes, never by the caller.
_INFERRED = ("f_num_channels", "g_num_channels", "f_layer_dim", "g_layer_dim")
_REWRAP = {
    "torch.compile": "torch.compile(patched)",
    "DataParallel": "nn.DataParallel(patched, ...)",
    "DistributedDataParallel": "DistributedDataParallel(patched, ...)",
}


def check_regbn_kwargs(kwargs: dict[str, Any], own: Iterable[str]) -> None:
    """TypeError naming a keyword that is neither insert's own (``own``) nor a RegBN constructor
    argument."""
    params = inspect.signature(RegBN.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n != "self" and n not in _INFERRED]
    for name in kwargs:
        if name in _INFERRED:
            raise RegBNTypeError(
                f"{name!r} is inferred from the shapes of each pair's tensors; drop it "
                "(pass example_inputs/input_shapes that give the shapes you want)"
            )
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted + list(own), n=2)
            did = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            raise RegBNTypeError(
                f"got an unexpected keyword argument {name!r}{did} Keywords other "
                "than insert's own are regbn_kwargs, passed to every regbn.RegBN layer, which "
                f"takes {accepted}"
            )


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside any wrappers, with a warning to wrap the patched model again."""
    inner, wrappers = unwrap(model)
    if wrappers:
        attrs = "".join("._orig_mod" if w == "torch.compile" else ".module" for w in wrappers)
        again = " then ".join(_REWRAP[w] for w in reversed(wrappers))
        warnings.warn(
            f"{type(model).__name__} wraps the model; patched model{attrs}, the "
            f"{type(inner).__name__} inside {' inside '.join(wrappers)}. The result is not "
            f"wrapped and its state_dict keys have no wrapper prefix; wrap it again after insert, "
            f"so that the new layers are part of it: {again}",
            RegBNWarning,
            stacklevel=1,
        )
    return inner


def warn_existing_layers(model: nn.Module) -> None:
    """Warn that layers the model already holds stay, and that remove keeps them."""
    held = [path for path, m in model.named_modules() if isinstance(m, RegBN)]
    if held:
        warnings.warn(
            f"the model already holds RegBN layers {held}; the new layers are added next "
            "to them (numbered after them). regbn.remove(patched) removes only the layers "
            "insert added",
            RegBNWarning,
            stacklevel=1,
        )


def var_args_hint(model: nn.Module, example_inputs: Any) -> str:
    """How to patch a model whose forward takes ``*args``/``**kwargs``; "" for any other."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    star = [("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name for p in params
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    if not star:
        return ""
    fixed = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    extra = list(example_inputs) if isinstance(example_inputs, dict) else ["a", "b"]
    names = list(dict.fromkeys(fixed + [n for n in extra if isinstance(n, str)]))
    call = ", ".join(f"{n}={n}" for n in names)
    return (
        f". {type(model).__name__}.forward takes {', '.join(star)}, which torch.fx traces as one "
        "argument, so shapes cannot be given per tensor. Wrap the model in a module whose forward "
        "names each input (names then start with 'model.'):\n"
        "    class Named(nn.Module):\n"
        "        def __init__(self, model):\n"
        "            super().__init__()\n"
        "            self.model = model\n"
        f"        def forward(self, {', '.join(names)}):\n"
        f"            return self.model({call})\n"
        "    patched = regbn.insert(Named(model), ...)\n"
        "or fix the extra arguments with concrete_args={...} where they are constants"
    )



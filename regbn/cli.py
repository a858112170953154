"""Command line: ``regbn inspect MODULE:FACTORY --input 2x1x28x28 --input 2x3x28x28``.

Shapes run on fake tensors, so no input data and no memory for activations is needed.
``--measure N`` (random batches of those shapes) or ``--batches FILE`` (the user's batches) adds
the cross-modal dependence at each fusion. Every user
error is one line on stderr, ``regbn inspect: ...`` (the command that refused, then the message),
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from torch import nn

from ._format import one_line
from .cli_batches import BatchesError, load_batches, random_batches
from .fx.report.api import inspect

__all__ = ["main"]

_PROG = "regbn"
_DEBUG_ENV = "REGBN_DEBUG"  # set to 1 to get the traceback of an unexpected error


class UserError(Exception):
    """A mistake in the command line or the model it names: reported in one line, status 2.

    ``command`` is what refused (``regbn inspect``; ``regbn`` before a command is known).
    """

    def __init__(self, message: str, command: str = f"{_PROG} inspect") -> None:
        super().__init__(message)
        self.command = command


class _Parser(argparse.ArgumentParser):
    # argparse prints usage plus an error and exits; we want one line instead. Its prog is the
    # command it parses: "regbn", or "regbn inspect" for the subcommand's own parser.
    def error(self, message: str) -> NoReturn:
        raise UserError(message, command=self.prog)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="RegBN tools for multimodal PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "inspect",
        help="show every tensor's shape, its modalities and the fusions of a model",
        description="Trace MODULE:FACTORY with torch.fx and propagate the --input shapes on "
        "fake tensors (no data, no activation memory). Prints a table, the fusions and the "
        "pairs to give regbn.insert.",
    )
    p.add_argument(
        "model",
        metavar="MODULE:FACTORY",
        help="importable module or path to a .py file, and a callable (function or "
        "class) in it that returns the nn.Module, e.g. mypkg.models:build",
    )
    p.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        metavar="[NAME[.KEY]=]SHAPE[:DTYPE]",
        help="one per forward argument, in order, or all by argument name (NAME=SHAPE; "
        "NAME.KEY=SHAPE for an entry of a dict argument), e.g. 2x1x28x28 or 2x16:int64",
    )
    p.add_argument(
        "--modality",
        "-m",
        dest="modalities",
        action="append",
        default=[],
        metavar="NAME=INPUT[,INPUT...]",
        help="group inputs into a named modality, e.g. text=input_ids,attention_mask "
        "(an entry of a dict argument as batch.audio); repeat per modality",
    )
    p.add_argument(
        "--leaf",
        dest="leaves",
        action="append",
        default=[],
        metavar="MODULE",
        help="keep a submodule as one call: its dotted path (text_encoder) or its class name "
        "(BertModel, for every submodule of that class); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--draw", metavar="FILE", help="write the graph picture (.svg or .png)")
    p.add_argument(
        "--depth",
        type=_depth,
        default=None,
        help="fold module calls deeper than N; 0 folds every top-level call (default: "
        "automatic)",
    )
    p.add_argument(
        "--all", dest="all_nodes", action="store_true", help="show every node, folding nothing"
    )
    _add_measure_options(p)
    return parser


def _add_measure_options(p: argparse.ArgumentParser) -> None:
    """``--measure N`` and ``--batches FILE``: the dependence at each fusion."""
    p.add_argument(
        "--measure",
        type=_count,
        metavar="N",
        help="measure the cross-modal dependence at each fusion on N batches of random inputs "
        "of the --input shapes (floats standard normal, integers 0 or 1, booleans coin flips). "
        "Random inputs measure the architecture (what it makes of unrelated inputs), not the "
        "data: use --batches for that. Give a batch size well above the branches' widths",
    )
    p.add_argument(
        "--batches",
        metavar="FILE",
        help="measure the cross-modal dependence at each fusion on your data: FILE holds a "
        "torch.save'd list of input tuples (or dicts of keyword inputs), one per batch, loaded "
        "with weights_only=True. Without --input, the first batch gives the shapes",
    )


def _count(text: str) -> int:
    """``--measure N``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--measure must be an integer >= 1, got {text!r}")
    return value


def _depth(text: str) -> int:
    """``--depth N``: an int >= 0, as ``Report.lines`` takes it (0 folds top-level calls)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--depth must be an integer >= 0, got {text!r}")
    return value


def parse_shape(text: str) -> tuple[int, ...] | tuple[tuple[int, ...], torch.dtype]:
    """``"2x1x28x28"`` -> ``(2, 1, 28, 28)``; ``"2x16:int64"`` -> ``((2, 16), torch.int64)``."""
    sizes, _, dtype_name = text.partition(":")
    example = "expected sizes joined by 'x' and an optional dtype, e.g. 2x1x28x28 or 2x16:int64"
    try:
        shape = tuple(int(s) for s in sizes.lower().split("x"))
    except ValueError:
        raise UserError(f"bad shape {text!r}: {example}") from None
    if any(s < 0 for s in shape):
        raise UserError(f"bad shape {text!r}: sizes must not be negative")
    if not dtype_name:
        return shape
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(
            f"bad shape {text!r}: unknown dtype {dtype_name!r} "
            "(use a torch dtype name such as float32, float64, int64, bool)"
        )
    return shape, dtype


def _input_shapes(specs: Sequence[str]) -> list[Any] | dict[str, Any]:
    if not specs:
        raise UserError(
            "no input shapes: give one --input per forward argument, "
            "e.g. --input 2x1x28x28 --input 2x3x28x28"
        )
    named = [spec.partition("=") for spec in specs]
    if not any(sep for _, sep, _ in named):
        return [parse_shape(spec.strip()) for spec in specs]
    if not all(sep for _, sep, _ in named):
        raise UserError("--input: give all inputs by position or all as NAME=SHAPE, not both")
    shapes: dict[str, Any] = {}
    for name, _, shape in named:
        # NAME.KEY=SHAPE is one entry of a dict argument: batch.audio=2x20 -> batch['audio'].
        arg, _, key = name.strip().partition(".")
        if not arg or (key and not isinstance(shapes.setdefault(arg, {}), dict)):
            raise UserError(f"--input: bad name {name.strip()!r} in {name}={shape}")
        if key:
            shapes[arg][key] = parse_shape(shape.strip())
        elif arg in shapes:
            raise UserError(f"--input: {arg!r} given twice")
        else:
            shapes[arg] = parse_shape(shape.strip())
    return shapes


def parse_modalities(specs: Sequence[str]) -> dict[str, list[str]] | None:
    """``["text=input_ids,attention_mask", "image=pixel_values"]`` -> a ``modalities`` dict.

    ``batch.audio`` names the entry ``batch['audio']`` of a dict argument, as ``--input`` does.
    """
    if not specs:
        return None
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, inputs = spec.partition("=")
        names = [i.strip() for i in inputs.split(",") if i.strip()]
        if not sep or not name.strip() or not names:
            raise UserError(
                f"--modality: expected NAME=INPUT[,INPUT...], e.g. "
                f"text=input_ids,attention_mask; got {spec!r}"
            )
        groups.setdefault(name.strip(), []).extend(_entry(i) for i in names)
    return groups


def _entry(name: str) -> str:
    arg, sep, key = name.partition(".")
    return f"{arg}[{key!r}]" if sep else name


def leaf_modules(model: nn.Module, specs: Sequence[str]) -> list[Any] | None:
    """``--leaf`` values as ``leaf_modules``: dotted paths as they are, class names as classes."""
    if not specs:
        return None
    paths = {name for name, _ in model.named_modules() if name}
    classes = {type(m).__name__: type(m) for m in model.modules()}
    out: list[Any] = []
    for spec in specs:
        if spec in paths:
            out.append(spec)
        elif spec in classes:
            out.append(classes[spec])
        else:
            close = difflib.get_close_matches(spec, sorted(paths | set(classes)), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(
                f"--leaf: {spec!r} is neither a submodule path nor the class name of a "
                f"submodule of {type(model).__name__}{hint}"
            )
    return out


def _import_module(name: str) -> ModuleType:
    looks_like_file = name.endswith(".py") or os.sep in name or "/" in name
    if looks_like_file:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"no such file: {name!r}")
        # Its folder goes on sys.path, so the file can import its neighbours.
        sys.path.insert(0, str(path.resolve().parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot load {name!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        # Registered (dataclasses and pickling look modules up) without shadowing one loaded.
        sys.modules.setdefault(spec.name, module)
        _run_user_code(lambda: spec.loader.exec_module(module), f"importing {name!r}")
        return module
    # Like `python -m`, look in the current folder too (a console script does not).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise UserError(
                f"cannot import module {name!r}: no module named {e.name!r} "
                "(give an importable module name or a path to a .py file)"
            ) from None
        raise UserError(f"importing {name!r} failed: {one_line(e)}") from None
    except Exception as e:  # the user's module raised while importing
        raise UserError(f"importing {name!r} failed: {type(e).__name__}: {one_line(e)}") from None


def _run_user_code(fn, what: str) -> Any:
    try:
        return fn()
    except Exception as e:
        raise UserError(f"{what} failed: {type(e).__name__}: {one_line(e)}") from None


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``MODULE:FACTORY``."""
    module_name, sep, factory_name = spec.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise UserError(f"expected MODULE:FACTORY (e.g. mypkg.models:build), got {spec!r}")
    module = _import_module(module_name)
    factory: Any = module
    for part in factory_name.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(factory) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"{module_name!r} has no attribute {factory_name!r}{hint}")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):  # a module-level instance is fine too
        return factory
    if not callable(factory):
        raise UserError(f"{spec!r} is of type {type(factory).__name__}, not a callable factory")
    model = _run_user_code(factory, f"calling {factory_name}()")
    if not isinstance(model, nn.Module):
        raise UserError(
            f"{factory_name}() returned a value of type {type(model).__name__}, not an nn.Module"
        )
    return model


def _inspect(args: argparse.Namespace) -> int:
    if args.draw is not None and Path(args.draw).suffix.lower() not in (".svg", ".png"):
        raise UserError(f"--draw writes .svg or .png, got {args.draw!r}")
    if args.measure is not None and args.batches is not None:
        raise UserError("--measure and --batches: give one (random inputs, or your batches)")
    try:
        batches = load_batches(args.batches) if args.batches is not None else None
    except BatchesError as e:
        raise UserError(str(e)) from None
    example = None
    if batches is not None and not args.inputs:
        shapes, example = None, batches[0]  # the first batch gives the shapes
    else:
        shapes = _input_shapes(args.inputs)
    modalities = parse_modalities(args.modalities)
    model = load_model(args.model)
    leaves = leaf_modules(model, args.leaves)
    if args.measure is not None:
        try:
            batches = random_batches(model, shapes, args.measure)
        except BatchesError as e:
            raise UserError(str(e)) from None
        print(
            f"{_PROG}: dependence measured on {args.measure} batches of random inputs: it shows "
            "what the architecture makes of unrelated inputs, not the dependence in your data "
            "(--batches FILE measures that)",
            file=sys.stderr,
        )
    try:
        report = inspect(
            model,
            example,
            input_shapes=shapes,
            modalities=modalities,
            leaf_modules=leaves,
            batches=batches,
            progress=sys.stderr.isatty(),  # a bar for people, none in logs and pipes
        )
    # TraceError is a ValueError; the others are inputs that do not fit the forward's arguments.
    except (ValueError, TypeError) as e:
        raise UserError(_api_message(e)) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table(depth=args.depth, all_nodes=args.all_nodes))
    if args.draw is not None:
        try:
            report.draw(args.draw, depth=args.depth, all_nodes=args.all_nodes)
        except ImportError:
            raise UserError(
                "--draw needs matplotlib and a layout engine: pip install 'regbn[draw]' "
                "(matplotlib, grandalf), or Graphviz's dot (apt-get install graphviz)"
            ) from None
        except (ValueError, TypeError) as e:
            raise UserError(_api_message(e)) from None
        except OSError as e:
            raise UserError(f"cannot write {args.draw!r}: {e.strerror or e}") from None
        print(f"{_PROG}: wrote {args.draw}", file=sys.stderr)
    if report.failure is not None:
        raise UserError(report.failure_text())
    return 0


def _api_message(error: Exception) -> str:
    """An error of ``regbn.inspect`` in one line, without its ``regbn.inspect: `` prefix (the
    line already starts with ``regbn inspect: ``)."""
    text = one_line(error)
    return text.removeprefix("regbn.inspect: ")


def _fail(message: str, command: str = f"{_PROG} inspect") -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to exit)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        # The top parser refuses unknown options even after a command: name the command then.
        known = argv[:1] == ["inspect"]
        return _fail(str(e), f"{_PROG} inspect" if known else e.command)
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _inspect(args)
    except UserError as e:
        return _fail(str(e), e.command)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except BrokenPipeError:  # `regbn inspect ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug of ours: still one line, unless asked for the traceback
        if os.environ.get(_DEBUG_ENV):
            raise
        return _fail(
            f"internal error: {type(e).__name__}: {one_line(e)} "
            f"(set {_DEBUG_ENV}=1 for the traceback)"
        )


if __name__ == "__main__":
    sys.exit(main())

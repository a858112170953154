"""regbn: RegBN multimodal normalisation, solved exactly, and torch.fx surgery to splice it in."""

from .distributed import convert_sync_regbn
from .errors import RegBNError, RegBNTypeError, RegBNValueError, RegBNWarning
from .fold import fold
from .fx.analysis import find_fusions
from .fx.dependence import DependenceReport, DependenceRow, dependence_of, measure_dependence
from .fx.insertion import insert, remove
from .fx.modality import Fusion
from .fx.report import Report, inspect
from .fx.tracing import TraceError
from .layer import RegBN

__all__ = [
    "DependenceReport",
    "DependenceRow",
    "Fusion",
    "RegBN",
    "RegBNError",
    "RegBNTypeError",
    "RegBNValueError",
    "RegBNWarning",
    "Report",
    "TraceError",
    "convert_sync_regbn",
    "dependence_of",
    "find_fusions",
    "fold",
    "insert",
    "inspect",
    "measure_dependence",
    "remove",
]

"""regbn: RegBN multimodal normalisation, solved exactly, and torch.fx surgery to splice it in."""

from .layer import RegBN

__all__ = ["RegBN"]

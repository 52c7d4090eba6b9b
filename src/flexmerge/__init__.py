"""flexmerge: data-free model merging at any size (FlexMerge, Dhasade et al., ICLR 2026)."""

from .errors import FlexMergeError
from .methods import available_methods, make_method

__version__ = "0.1.0"

__all__ = ["FlexMergeError", "available_methods", "make_method", "__version__"]

"""flexmerge: data-free model merging at any size (FlexMerge, Dhasade et al., ICLR 2026)."""

from .bundle import Bundle
from .config import MergeConfig, load_config
from .engine import FlexMerge
from .errors import FlexMergeError
from .plan import Plan
from .methods import available_methods, make_method
from .runtime import MultiTaskModel

__version__ = "0.1.0"

__all__ = ["Bundle", "FlexMerge", "FlexMergeError", "MergeConfig", "MultiTaskModel", "Plan", "load_config", "available_methods", "make_method", "__version__"]

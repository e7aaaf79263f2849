"""LoRA-guided structured pruning of transformers (LoRAPrune, arXiv 2305.18403)."""

from .errors import LoraPruneError
from .pipeline.export import save_pruned
from .pipeline.load import load_model
from .prune_config import PruneConfig
from .pruning import prune

__all__ = ["prune", "PruneConfig", "LoraPruneError", "save_pruned", "load_model"]

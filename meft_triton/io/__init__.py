"""Files: atomic writes (:mod:`.atomic`), adapter directories (:mod:`.adapter_files`) and
training checkpoints (:mod:`.training_state`)."""

from .adapter_files import load_adapter, read_adapter, save_adapter
from .training_state import load_training_state, read_training_state, save_training_state

__all__ = ["load_adapter", "load_training_state", "read_adapter", "read_training_state", "save_adapter",
           "save_training_state"]

"""Task data, parallel pairing, prompts and collators with alignment maps."""

from .collate import Batcher
from .tasks import DataError, load_examples

__all__ = ["Batcher", "DataError", "load_examples"]

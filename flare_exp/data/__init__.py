"""Task data (loaders driven by the task config), input formats and batches. Importing the
package loads no model library; the batchers live in ``collate`` (prompts, answers, sources)
and ``qa`` (span features)."""

from .tasks import DataError, load_examples

__all__ = ["DataError", "load_examples"]

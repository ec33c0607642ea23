"""poison: reproducible data-poisoning datasets (DeepConfuse, SIA, ...) as WebDataset shards.

Datasets produced by this package are POISONED: for research on robustness only.
"""

__version__ = "0.1.0"

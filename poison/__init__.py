"""poison: reproducible data-poisoning datasets (DeepConfuse, SIA, ...) as WebDataset shards.

Datasets produced by this package are POISONED: for research on robustness only.

    from poison import open_dataset      # stream a dataset folder, http(s)/s3 prefix or DVC path
"""

__version__ = "0.1.0"

__all__ = ["open_dataset", "__version__"]


def __getattr__(name: str):
    # lazy: `import poison` (the CLI's first step) stays free of torch until needed
    if name == "open_dataset":
        from poison.loader import open_dataset

        return open_dataset
    raise AttributeError(f"module 'poison' has no attribute {name!r}")

"""Hugging Face datasets as data paths, one syntax for every algorithm:
`hub:DATASET[@CONFIG][:SPLIT]` (split `train` when left out)."""

from __future__ import annotations

from fedtune.errors import DataError

PREFIX = "hub:"


def parse(path: str) -> tuple[str, str | None, str]:
    """(dataset, config or None, split) of a `hub:` path."""
    name, _, split = path[len(PREFIX):].partition(":")
    dataset, _, config = name.partition("@")
    if not dataset:
        raise DataError(f"'{path}': expected hub:DATASET[@CONFIG][:SPLIT]")
    return dataset, config or None, split or "train"


def load_records(path: str) -> list[tuple[str, dict]]:
    """(source, record) pairs of a `hub:` path, through the `datasets` package (optional extra)."""
    dataset, config, split = parse(path)
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{path}' needs the 'datasets' package: pip install 'fedtune[hub]'") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, missing dataset, auth: all user-fixable
        raise DataError(f"cannot load Hugging Face dataset '{path}': {e}") from None
    return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]

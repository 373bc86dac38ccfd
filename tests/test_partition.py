import numpy as np
import pytest

from fedtune.data import partition as P
from fedtune.errors import DataError

CATS = [c for c in "abcdefgh" for _ in range(50)] + ["a"] * 30


def _check_disjoint_complete(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert len(np.unique(allidx)) == n


@pytest.mark.parametrize("method", ["iid", "shards", "dirichlet"])
def test_partitions_are_disjoint_and_complete(method):
    parts = P.partition(CATS, method, 10, seed=1, shards_per_client=2, alpha=0.5, min_size=10)
    assert len(parts) == 10
    _check_disjoint_complete(parts, len(CATS))
    assert all(len(p) > 0 for p in parts)


def test_partition_is_seeded():
    a = P.partition(CATS, "dirichlet", 5, seed=3, alpha=0.5, min_size=10)
    b = P.partition(CATS, "dirichlet", 5, seed=3, alpha=0.5, min_size=10)
    c = P.partition(CATS, "dirichlet", 5, seed=4, alpha=0.5, min_size=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_shards_give_each_client_few_categories():
    parts = P.category_shards(CATS, 8, 2, seed=0)
    for p in parts:
        assert 1 <= len({CATS[i] for i in p}) <= 2 * 2  # each shard straddles at most 2 categories
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_dirichlet_respects_min_size_and_fails_clearly():
    parts = P.dirichlet(CATS, 6, 0.5, 40, seed=0)
    assert min(len(p) for p in parts) >= 40
    with pytest.raises(DataError, match="min_client_size"):
        P.dirichlet(CATS, 6, 0.5, 100, seed=0)


def test_holdout_is_stratified_and_excluded():
    train, test = P.holdout_stratified(CATS, 10, seed=42)
    assert len(test) == 80
    assert set(train).isdisjoint(test)
    assert len(train) + len(test) == len(CATS)
    for c in "abcdefgh":
        assert sum(CATS[i] == c for i in test) == 10


def test_empty_client_is_an_error():
    with pytest.raises(DataError, match="cannot be split"):
        P.partition(["a"] * 3, "iid", 5, seed=0)


def test_stratified_subset_covers_categories():
    items = list(range(len(CATS)))
    sub = P.stratified_subset(items, CATS, 16)
    assert len(sub) == 16
    assert {CATS[i] for i in sub} == set("abcdefgh")


@pytest.mark.parametrize("method", ["shards", "dirichlet"])
def test_a_split_by_category_of_one_category_data_warns(method, caplog):
    with caplog.at_level("WARNING", logger="fedtune.data.partition"):
        parts = P.partition(["all"] * 60, method, 3, 0, min_size=5)
    assert sum(len(p) for p in parts) == 60
    assert "every row has the same one ('all')" in caplog.text and "data.columns.category" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedtune.data.partition"):
        P.partition(["a", "b"] * 30, method, 3, 0, min_size=5)
        P.partition(["all"] * 60, "iid", 3, 0)
    assert not caplog.text

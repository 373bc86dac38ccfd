"""Which files a FedBPT task reads: a local training file never meets a built-in task's Hugging
Face test split by default, and a file that is both train and test must hold test rows out."""

import pytest

from fedtune import config as C
from fedtune.errors import ConfigError
from fedtune.fedbpt.session import prepare_task


def _tsv(tmp_path, n=40):
    path = tmp_path / "rows.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(n)))
    return path


def _cfg(*sets):
    return C.load(None, ["run.algorithm='fedbpt'", "task.k_shot=4", "task.dev_shots=2", "partition.num_clients=2",
                         "partition.method='iid'", *sets])


@pytest.mark.parametrize("given, unset", [("train_path", "test_path"), ("test_path", "train_path")])
def test_one_local_file_without_the_other_is_refused_naming_both_keys(tmp_path, given, unset):
    path = _tsv(tmp_path)
    with pytest.raises(ConfigError) as e:  # before the change: the other path became 'hub:glue@sst2:...'
        prepare_task(_cfg(f"task.{given}={str(path)!r}"))
    msg = str(e.value)
    assert f"task.{unset} is not set" in msg and f"task.{given} = {str(path)!r}" in msg and "hub" not in msg.lower()


def test_the_same_file_for_train_and_test_needs_rows_held_out(tmp_path):
    path = _tsv(tmp_path)
    with pytest.raises(ConfigError, match="task.test_max_rows = 0"):
        prepare_task(_cfg(f"task.train_path={str(path)!r}", f"task.test_path={str(path)!r}"))
    both = (f"task.train_path={str(path)!r}", f"task.test_path={str(path)!r}")
    data = prepare_task(_cfg(*both, "task.test_max_rows=10"))
    test = {e.texts for e in data.test}
    assert len(test) == 10 and not test & {e.texts for e in data.train + data.dev}
    assert len(data.train) == 8 and len(data.dev) == 4

import tomllib
from pathlib import Path

import pytest

from fedtune import config as C
from fedtune.config_resume import for_resume
from fedtune.errors import ConfigError


def test_defaults_roundtrip_through_toml(tmp_path):
    cfg = C.load()
    p = tmp_path / "c.toml"
    C.save(cfg, p)
    assert C.load(p) == cfg
    text = p.read_text()
    # every key carries a comment line right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), line


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        C.load(p)
    p.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'lr'"):
        C.load(p)
    p.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        C.load(p)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[run]\nrounds = "five"\n')
    with pytest.raises(ConfigError, match=r"run\.rounds must be an integer"):
        C.load(p)
    p.write_text('[model]\ndevice = "tpu"\n')
    with pytest.raises(ConfigError, match=r"model\.device"):
        C.load(p)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_every_shipped_config_saves_and_loads_back(tmp_path, name):
    """What `fedtune run` writes into the run folder (tables of lists, as AG News's
    word_candidates, included) reads back as the same config."""
    cfg = C.load(Path(__file__).parents[1] / "configs" / name)
    C.save(cfg, tmp_path / "config.toml")
    assert C.load(tmp_path / "config.toml") == cfg


def test_a_list_of_tables_stays_in_its_section(tmp_path):
    """compare.algorithms whose entries are all tables: tomli-w alone writes them as `[[algorithms]]`
    sections, outside [compare], and the run folder's config.toml (read by `fedtune compare --resume`)
    no longer loaded."""
    entries = ("[{name='fedavgm0.5_lr3', algorithm='fedavgm', set={server={server_lr=3.0, momentum=0.5}}}, "  # too long
               "{name='fedavg_lr3', algorithm='fedavgm', set={server={server_lr=3.0, momentum=0.0}}}]")  # for one line
    cfg = C.load(None, [f"compare.algorithms={entries}"])
    C.save(cfg, tmp_path / "config.toml")
    assert C.load(tmp_path / "config.toml") == cfg
    assert cfg.compare.algorithms[0]["set"]["server"]["momentum"] == 0.5


def test_overrides_parse_toml_values():
    cfg = C.load(None, ["train.lr=1e-4", "run.rounds=3", "lora.target_modules=['q_proj']", "run.name=x y"])
    assert cfg.train.lr == 1e-4 and cfg.run.rounds == 3 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.run.name == "x y"
    with pytest.raises(ConfigError, match="section"):
        C.load(None, ["rounds=3"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        C.load(None, ["train.batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="server.fraction"):
        C.load(None, ["server.fraction=0"])


def test_a_batch_smaller_than_the_default_micro_batch_is_one_forward():
    """batch_size = 4 with the default micro_batch_size (8) was refused as 'not a multiple'."""
    from fedtune.data.instructions import Tokenized
    from fedtune.fedit.train import micro_batches

    cfg = C.load(None, ["train.batch_size=4", "train.group_by_length=false"])
    rows = [Tokenized(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (7, 9, 11, 13)]
    assert micro_batches(rows, cfg.train) == [rows]


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[run\nx=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        C.load(p)


def test_printed_config_is_valid_toml():
    tomllib.loads(C.to_toml(C.load()))


# ----------------------------------------------------------------------------- TOML round trip


def test_random_strings_keys_and_values_survive_save_and_load(tmp_path):
    """Property test: templates, verbalizer keys and column names made of random characters
    (newlines, tabs, quotes, backslashes, control characters, non-ASCII) are written by
    config.save and read back by config.load unchanged."""
    import random

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0, 0x80)] + list("é∑\u2028\U0001F600 \"'\\[]{}=#.")

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    for i in range(60):
        cfg = C.load(None)
        cfg.run.name = text(12)
        cfg.task.template = text(40)
        cfg.task.verbalizer = {text(6) or "k": text(6) for _ in range(rng.randint(0, 4))}
        cfg.data.columns = {"instruction": text(8), "output": text(8)}
        cfg.task.text_columns = [text(5) for _ in range(rng.randint(0, 3))]
        cfg.judge.endpoint = ""
        path = tmp_path / f"c{i}.toml"
        C.save(cfg, path)
        back = tomllib.loads(path.read_text(encoding="utf-8"))
        assert back["task"]["template"] == cfg.task.template
        assert back["task"]["verbalizer"] == cfg.task.verbalizer
        assert back["data"]["columns"] == cfg.data.columns
        assert back["task"]["text_columns"] == cfg.task.text_columns and back["run"]["name"] == cfg.run.name


def test_a_template_with_a_newline_and_a_verbalizer_key_with_a_space_round_trip_through_load(tmp_path):
    cfg = C.load(None, ["run.algorithm='fedbpt'", "task.name='custom'", "task.text_columns=['text']",
                        "task.template=\"Review:\\n{text}\\nSentiment: <mask>\"",
                        "task.verbalizer={'very bad' = 'bad', 'very good' = 'good'}"])
    C.save(cfg, tmp_path / "config.toml")
    again = C.load(tmp_path / "config.toml")
    assert again.task.template == "Review:\n{text}\nSentiment: <mask>"
    assert list(again.task.verbalizer) == ["very bad", "very good"]


# ----------------------------------------------------------------------------- resume


def test_resume_accepts_rounds_and_refuses_keys_that_would_mix_two_runs():
    saved = C.load(None)
    merged = for_resume(saved, ["run.rounds=12", "eval.generate=false"], "run/config.toml")
    assert merged.run.rounds == 12 and not merged.eval.generate
    for key in ("run.seed=7", "partition.num_clients=3", "server.aggregation='fedadam'", "model.name='x'"):
        with pytest.raises(ConfigError, match=rf"--resume: {key.split('=')[0]} cannot change in a resumed run"):
            for_resume(saved, [key], "run/config.toml")


def test_resume_keeps_the_rounds_when_the_schedule_spans_the_run():
    """With train.schedule_span = 'run' the rounds already trained followed a schedule as long as
    the old run: a longer run would not end where an uninterrupted one does."""
    saved = C.load(None, ["train.schedule_span='run'"])
    assert for_resume(saved, ["eval.generate=false"], "run/config.toml").run.rounds == saved.run.rounds
    with pytest.raises(ConfigError, match=r"run\.rounds \(with train\.schedule_span = 'run'"):
        for_resume(saved, ["run.rounds=12"], "run/config.toml")

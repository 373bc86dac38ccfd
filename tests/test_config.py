import tomllib

import pytest

from fedtune import config as C
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


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[run\nx=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        C.load(p)


def test_printed_config_is_valid_toml():
    tomllib.loads(C.to_toml(C.load()))

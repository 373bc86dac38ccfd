"""Bad input, fuzzed: broken configs, data files and --set values fed through the `fedtune`
command. Every case must end with exit code 2 and one `error:` line that names the file and
line, or the config key; never a traceback. The corpus is generated here, nothing is stored.

Most cases call `fedtune.cli.main([...])` in-process (a subprocess costs seconds of start-up);
an exception escaping main() fails the test with its traceback. One case goes through a real
subprocess to check the exit code and stderr end to end. Two seeded mutation fuzzers then
throw hundreds of randomly damaged config and data files at the loaders.
"""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from fedtune import cli
from fedtune import config as C
from fedtune.data.instructions import load_rows
from fedtune.errors import ConfigError, DataError

GOOD = [{"instruction": f"What is {i} + 1?", "response": str(i + 1), "category": f"c{i % 2}"} for i in range(40)]


def _jsonl(recs):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


def _tiny(model):
    """Overrides that keep a run that gets past the input checks tiny."""
    return ["--set", f"model.name={json.dumps(str(model))}", "--set", "model.autocast='off'",
            "--set", "partition.num_clients=2", "--set", "partition.test_per_category=1",
            "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=2",
            "--set", "run.rounds=1", "--set", "eval.generate=false", "--set", "eval.compare_base=false", "--no-progress"]


# Each case: (files to write {name: str | bytes}, extra argv, a regex the error must match).
# "{d}" in argv is the case folder; a CONFIG case passes its file as the positional CONFIG.
CASES = {
    # ---- configs
    "toml_malformed": ({"c.toml": "[run\nrounds = 3\n"}, ["CONFIG"], r"c\.toml: invalid TOML: .*at line 1"),
    "toml_bad_value_line_3": ({"c.toml": "[run]\nseed = 1\nrounds = 3 3\n"}, ["CONFIG"], r"c\.toml: invalid TOML: .*line 3"),
    "toml_empty": ({"c.toml": ""}, ["CONFIG"], r"c\.toml: the config file is empty"),
    "toml_whitespace_only": ({"c.toml": "\n\n   \n"}, ["CONFIG"], r"c\.toml: the config file is empty"),
    "toml_invalid_utf8": ({"c.toml": b"[run]\nname = \"\xff\xfe\"\n"}, ["CONFIG"], r"c\.toml: not valid UTF-8"),
    "toml_utf16": ({"c.toml": "[run]\nrounds = 2\n".encode("utf-16")}, ["CONFIG"], r"c\.toml: not valid UTF-8"),
    "toml_nul_byte": ({"c.toml": "[run]\x00\nrounds = 3\n"}, ["CONFIG"], r"c\.toml: invalid TOML: .*line 1"),
    "toml_very_long_line": ({"c.toml": "[run]\nname = " + "x" * 1_000_000 + "\n"}, ["CONFIG"],
                            r"c\.toml: invalid TOML: .*line 2"),
    "toml_nested_arrays": ({"c.toml": "a = " + "[" * 50_000 + "]" * 50_000 + "\n"}, ["CONFIG"],
                           r"c\.toml: invalid TOML: arrays or tables nested too deeply"),
    "toml_nested_tables": ({"c.toml": "a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n"}, ["CONFIG"],
                           r"c\.toml: invalid TOML: arrays or tables nested too deeply"),
    "wrong_type_int": ({"c.toml": "[run]\nrounds = \"three\"\n"}, ["CONFIG"], r"c\.toml: run\.rounds must be an integer, got 'three'"),
    "wrong_type_list": ({"c.toml": "[lora]\ntarget_modules = 'q_proj'\n"}, ["CONFIG"], r"lora\.target_modules must be a list"),
    "wrong_type_bool": ({"c.toml": "[run]\nprogress = 1\n"}, ["CONFIG"], r"run\.progress must be true or false"),
    "wrong_type_table": ({"c.toml": "[data]\ncolumns = 5\n"}, ["CONFIG"], r"data\.columns must be a table"),
    "wrong_type_datetime": ({"c.toml": "[run]\nname = 1979-05-27T07:32:00Z\n"}, ["CONFIG"], r"run\.name must be a string"),
    "section_not_table": ({"c.toml": "run = 3\n"}, ["CONFIG"], r"c\.toml: 'run' must be a table"),
    "array_of_tables": ({"c.toml": "[[server]]\nfraction = 1.0\n"}, ["CONFIG"], r"c\.toml: 'server' must be a table"),
    "unknown_key": ({"c.toml": "[train]\nlearning_rate = 1e-4\n"}, ["CONFIG"], r"c\.toml: unknown key 'train\.learning_rate'"),
    "unknown_section": ({"c.toml": "[trian]\nlr = 1e-4\n"}, ["CONFIG"], r"c\.toml: unknown section '\[trian\]' \(did you mean 'train'\?\)"),
    "bad_literal": ({"c.toml": "[server]\naggregation = 'kurm'\n"}, ["CONFIG"], r"server\.aggregation = 'kurm' is not one of"),
    "config_is_a_folder": ({}, ["{d}"], r"config file not found"),
    "config_missing": ({}, ["{d}/none.toml"], r"config file not found: .*none\.toml"),
    # ---- bad --set values
    "set_no_equals": ({}, ["--set", "run.rounds"], r"--set 'run\.rounds': expected section\.key=value"),
    "set_no_section": ({}, ["--set", "rounds=3"], r"--set 'rounds=3': the key must name a section"),
    "set_wrong_type": ({}, ["--set", "run.rounds=abc"], r"run\.rounds must be an integer, got 'abc'"),
    "set_inf": ({}, ["--set", "train.lr=inf"], r"train\.lr must be a finite number, got inf"),
    "set_nan": ({}, ["--set", "train.lr=nan"], r"train\.lr must be a finite number, got nan"),
    "set_float_overflow": ({}, ["--set", "server.fraction=1e400"], r"server\.fraction must be a finite number"),
    "set_through_a_value": ({}, ["--set", "run.rounds.x=3"], r"--set 'run\.rounds\.x=3': 'rounds' is not a table"),
    "set_unknown_key": ({}, ["--set", "server.agregation='median'"], r"unknown key 'server\.agregation' \(did you mean 'aggregation'\?\)"),
    "set_nested_value": ({}, ["--set", "run.name=" + "[" * 50_000], r"--set run\.name=\.\.\.: the value is nested too deeply"),
    "set_negative_seed": ({}, ["--set", "run.seed=-1"], r"run\.seed must be in \[0, 2\*\*63\)"),
    "set_zero_eval_batch": ({}, ["--set", "eval.batch_size=0"], r"eval\.batch_size must be >= 1"),
    "set_negative_max_rows": ({}, ["--set", "data.max_rows=-1"], r"data\.max_rows must be >= 0"),
    "set_negative_weight_decay": ({}, ["--set", "train.weight_decay=-1"], r"train\.weight_decay must be >= 0"),
    "set_zero_new_tokens": ({}, ["--set", "eval.max_new_tokens=0"], r"eval\.max_new_tokens must be >= 1"),
    "set_min_clients_too_high": ({}, ["--set", "server.min_clients=5"], r"server\.min_clients = 5 exceeds the 2 client"),
    "set_trim_half": ({}, ["--set", "server.trim_fraction=0.5"], r"server\.trim_fraction must be in \[0, 0\.5\)"),
    "set_fault_kind": ({}, ["--set", "faults.kinds=['crash']"], r"faults\.kinds: unknown kind 'crash'"),
    "set_fault_timeout_without_limit": ({}, ["--set", "faults.probability=0.3"], r"set server\.client_timeout > 0"),
    "out_under_a_file": ({"f": "x"}, ["--out", "{d}/f/run"], r"--out: cannot create the run folder .*f/run"),
    # ---- data files
    "data_missing": ({}, ["--set", "data.path='{d}/none.jsonl'"], r"data file not found: .*none\.jsonl"),
    "data_empty": ({"d.jsonl": ""}, ["DATA d.jsonl"], r"d\.jsonl: the file is empty"),
    "data_blank_lines": ({"d.jsonl": "\n \n\t\n"}, ["DATA d.jsonl"], r"d\.jsonl: the file is empty"),
    "data_empty_list": ({"d.json": "[]"}, ["DATA d.json"], r"d\.json: no records"),
    "data_null": ({"d.json": "null"}, ["DATA d.json"], r"d\.json: expected a JSON list of objects, got NoneType"),
    "data_malformed_json": ({"d.json": '[{"instruction": "a",\n "response": }]'}, ["DATA d.json"],
                            r"d\.json:2: malformed JSON"),
    "data_malformed_line_3": ({"d.jsonl": _jsonl(GOOD[:2] + ['{"instruction": "a", "response": "b"'])}, ["DATA d.jsonl"],
                              r"d\.jsonl:3: malformed JSON"),
    "data_invalid_utf8_line_2": ({"d.jsonl": _jsonl(GOOD[:1]).encode() + b'{"instruction": "\xff"}\n'}, ["DATA d.jsonl"],
                                 r"d\.jsonl:2: not valid UTF-8"),
    "data_invalid_utf8_json": ({"d.json": b'[{"instruction": "\xc3\x28"}]'}, ["DATA d.json"], r"d\.json: not valid UTF-8"),
    "data_lone_surrogate": ({"d.jsonl": _jsonl(GOOD[:3] + ['{"instruction": "\\ud800", "response": "x"}'])}, ["DATA d.jsonl"],
                            r"d\.jsonl:4: field 'instruction' holds an invalid escape"),
    "data_nested_deep": ({"d.json": "[" * 100_000 + "]" * 100_000}, ["DATA d.json"], r"d\.json: unreadable JSON: nested too deeply"),
    "data_nested_deep_line": ({"d.jsonl": _jsonl(GOOD[:1]) + "[" * 100_000 + "]" * 100_000 + "\n"}, ["DATA d.jsonl"],
                              r"d\.jsonl:2: unreadable JSON: nested too deeply"),
    "data_huge_integer": ({"d.jsonl": '{"instruction": "a", "response": "b", "category": 1' + "0" * 5000 + "}\n"},
                          ["DATA d.jsonl"], r"d\.jsonl:1: unreadable JSON"),
    "data_wrong_type": ({"d.jsonl": _jsonl(GOOD[:2] + [{"instruction": ["a"], "response": "b"}])}, ["DATA d.jsonl"],
                        r"d\.jsonl:3: field 'instruction' must be a string, got list"),
    "data_nan_response": ({"d.jsonl": '{"instruction": "a", "response": NaN}\n'}, ["DATA d.jsonl"],
                          r"d\.jsonl:1: field 'response' must be a string, got float"),
    "data_not_an_object": ({"d.jsonl": _jsonl(GOOD[:1]) + "[1, 2]\n"}, ["DATA d.jsonl"], r"d\.jsonl:2: expected a JSON object"),
    "data_missing_column": ({"d.jsonl": _jsonl(GOOD[:3] + [{"instruction": "a", "context": "b"}])}, ["DATA d.jsonl"],
                            r"d\.jsonl:4: missing field 'response'"),
    "data_unknown_schema": ({"d.jsonl": _jsonl([{"question": "a", "answer": "b"}])}, ["DATA d.jsonl"],
                            r"d\.jsonl:1: cannot tell the schema.*data\.format = 'columns'"),
    "data_mapped_column_absent": ({"d.jsonl": _jsonl(GOOD)}, ["DATA d.jsonl", "--set", "data.format='columns'",
                                                           "--set", "data.columns={instruction='q', output='a'}"],
                                  r"d\.jsonl:1: missing field 'q' \(instruction\)"),
    "data_empty_instruction": ({"d.jsonl": _jsonl(GOOD[:2] + [{"instruction": " ", "response": "b"}])}, ["DATA d.jsonl"],
                               r"d\.jsonl:3: field 'instruction' is empty"),
    "data_very_long_line": ({"d.jsonl": _jsonl([{"instruction": "x " * 300_000, "response": "y"}] + GOOD)}, ["DATA d.jsonl"],
                            r"d\.jsonl:1: the prompt is \d+ tokens, but data\.cutoff_len = 256"),
    "data_wrong_extension": ({"d.csv": "instruction,response\na,b\n"}, ["DATA d.csv"], r"d\.csv: expected a \.json or \.jsonl file"),
    "data_test_path_broken": ({"d.jsonl": _jsonl(GOOD), "t.json": '{"a": '}, ["DATA d.jsonl", "--set", "data.test_path='{d}/t.json'"],
                              r"t\.json:1: malformed JSON"),
    "data_test_path_empty_list": ({"d.jsonl": _jsonl(GOOD), "t.json": "[]"},
                                  ["DATA d.jsonl", "--set", "data.test_path='{d}/t.json'"], r"t\.json: no records"),
    "data_too_few_rows": ({"d.jsonl": _jsonl(GOOD[:1])}, ["DATA d.jsonl", "--set", "partition.test_per_category=0"],
                          r"1 training rows cannot be split across 2 clients: lower partition\.num_clients"),
}


def _argv(case_dir: Path, files: dict, extra: list, model) -> list:
    for name, content in files.items():
        p = case_dir / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    argv, config = [], []
    for a in extra:
        if a == "CONFIG":
            config = [str(case_dir / next(n for n in files if n.endswith(".toml")))]
        elif a.startswith("DATA "):
            argv += ["--set", f"data.path='{case_dir / a[5:]}'"]
        else:
            argv.append(a.replace("{d}", str(case_dir)))
    if argv[:1] and not argv[0].startswith("-"):  # a positional CONFIG given as a path
        config, argv = argv[:1], argv[1:]
    out = [] if "--out" in argv else ["--out", str(case_dir / "run")]
    if config:  # a broken config file: nothing may override what is broken in it
        return ["run", *config, *out, "--no-progress", *argv]
    return ["run", *out, *_tiny(model), *argv]  # the case's own --set come last and win


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, tiny_llama, capsys):
    files, extra, expect = CASES[case]
    rc = cli.main(_argv(tmp_path, files, extra, tiny_llama))  # an exception escaping here fails the test
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert re.search(expect, lines[0]), lines[0]
    assert "Traceback" not in out + err
    assert len(lines[0]) < 1000, "the message must not dump the input"


def test_the_command_itself_exits_2_with_one_error_line(tmp_path):
    """End to end in a real process: deep nesting used to escape as a RecursionError."""
    bad = tmp_path / "c.toml"
    bad.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", str(bad), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}: invalid TOML: arrays or tables nested too deeply"
    assert "Traceback" not in r.stderr + r.stdout


# ---------------------------------------------------------------------------- seeded mutation fuzzing


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    """One to three random edits: delete, insert or replace bytes, duplicate or drop a line, truncate."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1) if b else 0
        if op == 0 and b:
            del b[i:i + rng.randint(1, 8)]
        elif op == 1:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 2 and b:
            b[min(i, len(b) - 1)] = rng.choice(b'"[]{}=,:\\\n\x00\xff0123456789.-eE tfn')
        elif op == 3:
            lines = bytes(b).split(b"\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])
            b = bytearray(b"\n".join(lines))
        elif op == 4:
            lines = bytes(b).split(b"\n")
            del lines[rng.randrange(len(lines))]
            b = bytearray(b"\n".join(lines))
        else:
            b = b[:i]
    return bytes(b)


def test_randomly_damaged_configs_load_or_raise_config_error(tmp_path):
    cfg = C.from_dict({"run": {"rounds": 3}, "server": {"aggregation": "trimmed_mean", "clip_norm": 1.0, "trim_fraction": 0.2},
                       "faults": {"probability": 0.2, "kinds": ["raise"]}, "data": {"columns": {"instruction": "q"}}})
    base = C.to_toml(cfg).encode()
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "error": 0}
    for i in range(400):
        p = tmp_path / f"m{i}.toml"
        p.write_bytes(_mutate(rng, base))
        try:
            C.load(p)
            outcomes["loaded"] += 1
        except ConfigError as e:  # anything else escapes and fails the test
            msg = str(e)
            assert str(p) in msg, msg  # the message names the file
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["loaded"] > 10, outcomes  # the fuzzer hit both sides


def test_randomly_damaged_data_files_load_or_raise_data_error(tmp_path):
    src = write_jsonl(tmp_path / "good.jsonl", GOOD[:6] + [{"instruction": "é ü ∑", "input": "", "output": "ok",
                                                            "category": "x"}])
    raw_jsonl = src.read_bytes()
    raw_json = json.dumps(GOOD[:6], indent=1).encode()
    rng = random.Random(99)
    outcomes = {"loaded": 0, "error": 0}
    for i in range(300):
        suffix, raw = (".jsonl", raw_jsonl) if i % 2 else (".json", raw_json)
        p = tmp_path / f"m{i}{suffix}"
        p.write_bytes(_mutate(rng, raw))
        for fmt in ("auto", "dolly"):
            try:
                load_rows(str(p), fmt)
                outcomes["loaded"] += 1
            except DataError as e:
                assert str(p) in str(e), str(e)
                outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["loaded"] > 10, outcomes
    shutil.rmtree(tmp_path)

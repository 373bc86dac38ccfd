"""End-to-end through the `fedtune` command on a tiny random 2-layer Llama."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl


def fedtune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _tiny_args(model):
    return ["--set", f"model.name={json.dumps(str(model))}", "--set", "model.autocast='off'",
            "--set", "data.demo_rows_per_skill=24", "--set", "partition.num_clients=3",
            "--set", "partition.test_per_category=2", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", "train.micro_batch_size=2", "--set", "eval.max_new_tokens=4", "--no-progress"]


def test_run_end_to_end_on_tiny_llama(tiny_llama, tmp_path):
    out = tmp_path / "run"
    r = fedtune("run", "--out", str(out), "--set", "run.rounds=2", *_tiny_args(tiny_llama))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "Held-out results after 2 rounds" in r.stdout and "base EM" in r.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in recs] == [1, 2]
    for rec in recs:
        assert len(rec["clients"]) == 3 and rec["bytes_down"] > 0 and rec["bytes_up"] > 0
        assert all(c["examples"] > 0 and np.isfinite(c["train_loss"]) for c in rec["clients"])
        assert np.isfinite(rec["eval"]["loss"]) and "wall_time" in rec
    assert "exact_match_by_category" in recs[-1]["eval"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and "base" in summary
    # the saved global adapter opens with PEFT as it is, and equals the last round's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.fedit.lora import AdapterSlot

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out / "adapter"))
    m2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out / "rounds/round_002"))
    a, b = AdapterSlot(m).get(), AdapterSlot(m2).get()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.any(v != 0) for k, v in a.items() if "lora_B" in k)  # training moved B off zero
    # the resolved config was saved and reloads
    assert (out / "config.toml").is_file()
    # generate with the saved adapter
    g = fedtune("generate", "--adapter", str(out / "adapter"), "--prompt", "What is 1 + 2?", "--max-new-tokens", "3")
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout.strip().splitlines()[-1])["prompt"] == "What is 1 + 2?"


def test_partition_command_writes_disjoint_client_files(tmp_path):
    r = fedtune("partition", "--out", str(tmp_path / "parts"), "--set", "data.demo_rows_per_skill=20",
                "--set", "partition.num_clients=4")
    assert r.returncode == 0, r.stderr
    assert "client_003" in r.stdout and "held-out global test set" in r.stdout
    seen = []
    for i in range(4):
        seen += (tmp_path / "parts" / f"client_{i:03d}.jsonl").read_text().splitlines()
    test = (tmp_path / "parts" / "global_test.jsonl").read_text().splitlines()
    assert len(seen) + len(test) == 20 * 6 and len(set(seen)) == len(seen) and not set(seen) & set(test)


def test_help_on_every_subcommand():
    for sub in ([], ["run"], ["partition"], ["generate"], ["config"]):
        r = fedtune(*sub, "--help")
        assert r.returncode == 0 and "usage: fedtune" in r.stdout


def test_config_prints_loadable_commented_toml(tmp_path):
    r = fedtune("config", "--set", "run.rounds=3")
    assert r.returncode == 0
    p = tmp_path / "c.toml"
    p.write_text(r.stdout)
    r2 = fedtune("config", str(p))
    assert r2.stdout == r.stdout and "rounds = 3" in r.stdout and "# number of communication rounds" in r.stdout


@pytest.mark.parametrize("case,expect", [
    ("missing_data", "data file not found"),
    ("bad_line", "bad.jsonl:2: malformed JSON"),
    ("missing_field", "missing field 'response'"),
    ("unknown_model", "unknown model 'no-such-model'"),
    ("cutoff", "leaves no room for the response"),
    ("unknown_key", "did you mean 'rounds'"),
    ("empty_client", "cannot be split across 50 clients"),
])
def test_bad_input_is_one_clear_error_without_traceback(case, expect, tmp_path, tiny_llama):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, "{oops"])
    nofield = write_jsonl(tmp_path / "nf.jsonl", [{"instruction": "a", "context": ""}])
    args = {
        "missing_data": ["--set", f"data.path='{tmp_path / 'none.jsonl'}'"],
        "bad_line": ["--set", f"data.path='{bad}'"],
        "missing_field": ["--set", f"data.path='{nofield}'", "--set", "data.format='dolly'"],
        "unknown_model": ["--set", "model.name='no-such-model'"],
        "cutoff": ["--set", f"model.name='{tiny_llama}'", "--set", "data.cutoff_len=10"],
        "unknown_key": ["--set", "run.roundz=3"],
        "empty_client": ["--set", "partition.num_clients=50", "--set", "data.demo_rows_per_skill=5",
                         "--set", "partition.test_per_category=0"],
    }[case]
    r = fedtune("run", "--out", str(tmp_path / "r"), "--no-progress", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout

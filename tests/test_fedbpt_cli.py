"""FedBPT end to end through the `fedtune` command on tiny random models: run, resume,
classify, reference mode on a masked LM, and one clear error per bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest


def fedtune(*args):
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=600)


def _data(tmp_path, labels=(0, 1)):
    rng = np.random.default_rng(0)
    pos, neg = ["great", "good", "fun"], ["dull", "slow", "awful"]
    for name, n in (("train", 60), ("test", 24)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            lab = labels[i % len(labels)]
            lead = "the movie was" if name == "train" else "it was"  # no test sentence repeats a training one
            lines.append(f"{lead} {rng.choice(pos if lab else neg)} and {rng.choice(['long', 'short'])} \t{lab}")
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.tsv", tmp_path / "test.tsv"


def _args(model, train, test, rounds=3):
    return ["--no-progress", "--set", "run.algorithm='fedbpt'", "--set", f"run.rounds={rounds}",
            "--set", f"model.name={str(model)!r}", "--set", "model.autocast='off'",
            "--set", "partition.num_clients=3", "--set", "partition.method='iid'",
            "--set", f"task.train_path={str(train)!r}", "--set", f"task.test_path={str(test)!r}",
            "--set", 'task.verbalizer={"0" = "is", "1" = "the"}', "--set", "task.k_shot=6", "--set", "task.dev_shots=4",
            "--set", "fedbpt.intrinsic_dim=24", "--set", "fedbpt.n_prompt_tokens=3", "--set", "fedbpt.popsize=4",
            "--set", "fedbpt.local_iter=2"]


def test_run_resume_and_classify_on_tiny_llama(tiny_llama, tmp_path):
    train, test = _data(tmp_path)
    out = tmp_path / "run"
    r = fedtune("run", "--out", str(out), *_args(tiny_llama, train, test, rounds=2))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "FedBPT (improved) on sst2" in r.stdout and "best by dev" in r.stdout
    r = fedtune("run", "--resume", str(out), "--no-progress", "--set", "run.rounds=3")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "resuming after round 2" in r.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in recs] == [1, 2, 3]
    for rec in recs:
        assert 0 <= rec["eval"]["dev_accuracy"] <= 1 and np.isfinite(rec["eval"]["dev_loss"])
        assert len(rec["clients"]) == 3
        assert all(0 < c["bytes_down"] <= 8192 and 0 < c["bytes_up"] <= 8192 for c in rec["clients"])
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "fedbpt" and s["rounds"] == 3 and s["selected"] == "best"
    for key in ("zero_prompt", "best", "final"):
        assert 0 <= s[key]["test"]["accuracy"] <= 1 and s[key]["test"]["rows"] == 24
    assert s["final"]["round"] == 3 and 0 <= s["best"]["round"] <= 3
    assert s["communication"]["bytes_down_per_client_round_max"] <= 8192
    meta = json.loads((out / "prompt" / "prompt.json").read_text())
    assert meta["round"] == s["best"]["round"] and meta["projection"]["intrinsic_dim"] == 24
    assert (out / "report.md").is_file() and (out / "plots" / "server_metrics.png").is_file()
    # classify new text with the saved global prompt
    c = fedtune("classify", str(out / "prompt"), "--text", "the movie was great", "--text", "so dull",
                "--set", "model.autocast='off'")
    assert c.returncode == 0, c.stderr
    lines = [json.loads(x) for x in c.stdout.strip().splitlines()]
    assert [x["text"] for x in lines] == ["the movie was great", "so dull"]
    assert all(x["label"] in ("0", "1") and abs(sum(x["probs"].values()) - 1) < 1e-3 for x in lines)


def test_reference_mode_on_a_masked_lm(tiny_roberta, tmp_path):
    train, test = _data(tmp_path)
    out = tmp_path / "ref"
    r = fedtune("run", "--out", str(out), *_args(tiny_roberta, train, test, rounds=2),
                "--set", "fedbpt.mode='reference'", "--set", "fedbpt.prompt_mode='cat'")
    assert r.returncode == 0, r.stderr + r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "reference" and s["selected"] == "final" and s["best"]["test"] is not None
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["clients"][0]["bytes_down"] > 24 * 24 * 8  # the covariance matrix crosses the wire
    assert "global_sigma" in rec["aggregate"]


@pytest.mark.parametrize("case,expect", [
    ("no_placeholder", "has no text placeholder; put {sentence} where the text goes"),
    ("multi_token_word", "word 'bad' is not one token for model"),
    ("label_outside", ".tsv:2: label '2' is not in task.verbalizer"),  # test file or training file, whichever is read first
    ("few_rows", "has 30 rows; task.k_shot = 40 plus task.dev_shots = 4 need 44"),
    ("perf_perturb", "cannot be divided by a perturbed loss"),
])
def test_bad_input_is_one_clear_error(case, expect, tiny_llama, tmp_path):
    train, test = _data(tmp_path, labels=(2, 0, 1) if case == "label_outside" else (0, 1))
    extra = {
        "no_placeholder": ["--set", "task.template='<P> It was <mask> .'"],
        "multi_token_word": ["--set", 'task.verbalizer={"0" = "is", "1" = "bad"}'],
        "label_outside": [],
        "few_rows": ["--set", "task.k_shot=40"],
        "perf_perturb": ["--set", "fedbpt.loss='perf'"],
    }[case]
    r = fedtune("run", "--out", str(tmp_path / "r"), *_args(tiny_llama, train, test), *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_help_and_config_sections():
    r = fedtune("classify", "--help")
    assert r.returncode == 0 and "usage: fedtune classify" in r.stdout
    r = fedtune("config", "--set", "run.algorithm='fedbpt'")
    assert r.returncode == 0 and "[fedbpt]" in r.stdout and "[task]" in r.stdout and "intrinsic_dim = 500" in r.stdout

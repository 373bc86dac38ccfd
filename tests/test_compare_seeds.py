"""benchmarks/compare_seeds.py: gaps to centralized over seeds, and one seed's folders at two settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_seeds.py"


def folder(path: Path, exact: dict[str, float]) -> Path:
    path.mkdir(parents=True)
    variants = {name: {"final": {"loss": 0.1, "rouge_l": 0.5, "exact_match": em}} for name, em in exact.items()}
    (path / "compare.json").write_text(json.dumps({"variants": variants}))
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_gaps_per_folder_and_to_the_best_centralized_setting(tmp_path):
    a1 = folder(tmp_path / "a1", {"centralized": 0.80, "federated x": 0.60})
    b1 = folder(tmp_path / "b1", {"centralized": 0.70, "federated x": 0.65})   # seed 1 at another setting
    a2 = folder(tmp_path / "a2", {"centralized": 0.90, "federated x": 0.75})
    b2 = folder(tmp_path / "b2", {"centralized": 0.95, "federated x": 0.85})
    out = tmp_path / "out.json"
    done = run(f"{a1}+{b1}", f"{a2}+{b2}", "--tag", f"{b1}= @b", "--tag", f"{b2}= @b", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"centralized", "centralized @b", "federated x", "federated x @b"}
    # against its own folder's centralized: (80-60, 90-75) and (70-65, 95-85)
    assert rows["federated x"]["gap_points_per_seed"] == pytest.approx([20.0, 15.0])
    assert rows["federated x @b"]["gap_points_per_seed"] == pytest.approx([5.0, 10.0])
    # against the best centralized setting, one for all seeds: 'centralized' (mean 85) over '@b' (mean 82.5)
    assert rows["federated x @b"]["best_centralized"] == "centralized"
    assert rows["federated x @b"]["gap_to_best_centralized_per_seed"] == pytest.approx([15.0, 5.0])
    assert rows["federated x"]["gap_to_best_centralized_per_seed"] == pytest.approx([20.0, 15.0])
    assert rows["centralized @b"]["gap_points_per_seed"] is None
    assert rows["centralized @b"]["gap_to_best_centralized_per_seed"] == pytest.approx([10.0, -5.0])


def test_the_same_variant_in_two_folders_of_a_seed_must_be_tagged(tmp_path):
    a = folder(tmp_path / "a", {"centralized": 0.8})
    b = folder(tmp_path / "b", {"centralized": 0.7})
    done = run(f"{a}+{b}")
    assert done.returncode != 0 and "'centralized' is in two of its folders" in done.stderr


def test_a_seed_without_centralized_is_refused(tmp_path):
    a = folder(tmp_path / "a", {"federated x": 0.8})
    done = run(str(a))
    assert done.returncode != 0 and "no centralized variant" in done.stderr

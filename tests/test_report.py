"""report.md for any run folder: from metrics.jsonl + summary.json + config.toml alone."""

import json
import subprocess
import sys

import pytest

from fedtune import config as C
from fedtune.errors import FedtuneError
from fedtune.reporting import write_report


def _png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def _fedbpt_like_run(run_dir, rounds=3, clients=4):
    """A run folder as another algorithm writes it: accuracy eval, clients report 'loss'."""
    run_dir.mkdir()
    C.save(C.load(None, ["run.algorithm='fedbpt'"]), run_dir / "config.toml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in range(1, rounds + 1):
            f.write(json.dumps({
                "round": r, "selected": [f"c{i}" for i in range(clients)], "dropped": [] if r < 3 else
                [{"id": "c9", "reason": "timeout: 5s"}],
                "clients": [{"id": f"c{i}", "loss": 1.0 / r + 0.1 * i, "examples": 40, "bytes_down": 2100,
                             "bytes_up": 2100} for i in range(clients)],
                "eval": {"accuracy": 0.5 + 0.1 * r, "loss": 0.7 - 0.1 * r}, "bytes_down": 2100 * clients,
                "bytes_up": 2100 * clients, "round_seconds": 1.5, "wall_time": 1.5 * r}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "algorithm": "fedbpt", "rounds": rounds, "seconds": 4.5,
        "final": {"accuracy": 0.8, "loss": 0.4, "accuracy_by_category": {"negative": 0.75, "positive": 0.85}},
        "base": {"accuracy": 0.5, "loss": 0.69, "accuracy_by_category": {"negative": 0.0, "positive": 1.0}}}))
    return run_dir


def test_report_for_a_run_folder_of_another_algorithm(tmp_path):
    run = _fedbpt_like_run(tmp_path / "run")
    path = write_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert "Algorithm **fedbpt** · 3 rounds" in text
    # results table: per category and overall, base vs final
    assert "| category | base accuracy | final accuracy | base loss | final loss |" in text, text[:600]
    assert "| negative | 0.0% | 75.0% |" in text and "| **all** | 50.0% | 80.0% | 0.6900 | 0.4000 |" in text
    # per-round table, dropped clients, the resolved config
    assert "| 3 | 4 | 1 |" in text and "round 3: c9: timeout: 5s" in text
    assert 'algorithm = "fedbpt"' in text
    for name in ("global_metric", "client_train_loss", "communication"):
        assert f"(plots/{name}.png)" in text
        w, h = _png_size(run / "plots" / f"{name}.png")
        assert w > 300 and h > 200


def test_report_of_an_unfinished_run_and_of_bad_input(tmp_path):
    run = _fedbpt_like_run(tmp_path / "run")
    (run / "summary.json").unlink()
    text = write_report(run).read_text()
    assert "has not finished; 3 round(s) recorded" in text and "(plots/global_metric.png)" in text
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(FedtuneError, match=r"metrics.jsonl:4: malformed JSON"):
        write_report(run)
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "report", str(run)], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl:4: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "is it a fedtune run folder" in r.stderr


def test_fedit_run_writes_its_report(tiny_llama, tmp_path):
    """The hook at the end of the FedIT recipe: a real (tiny) run gets report.md with plots."""
    from fedtune import runner

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", "run.rounds=2",
                        "data.demo_rows_per_skill=12", "partition.num_clients=3", "partition.test_per_category=2",
                        "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
                        "eval.max_new_tokens=3", "run.progress=false", "run.save_every_round=false"])
    run = tmp_path / "run"
    run.mkdir()
    C.save(cfg, run / "config.toml")
    summary = runner.run(cfg, run)
    text = (run / "report.md").read_text()
    assert "Algorithm **fedit** · 2 rounds" in text
    assert "base rouge_l" in text and "final exact_match" in text and "| **all** |" in text
    assert "3 clients holding" in text
    for name in ("global_metric", "client_train_loss", "communication"):
        _png_size(run / "plots" / f"{name}.png")
    assert "rouge_l_by_category" in summary["final"]


def test_a_run_without_held_out_rows_reports_no_metric_not_zero(tiny_llama, tmp_path):
    from fedtune import runner

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", "run.rounds=1",
                        "data.demo_rows_per_skill=12", "partition.num_clients=2", "partition.test_per_category=0",
                        "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
                        "run.progress=false", "run.save_every_round=false"])
    run = tmp_path / "run"
    run.mkdir()
    summary = runner.run(cfg, run)
    assert summary["final"] == {"rows": 0} and summary["base"] == {"rows": 0}  # no loss of 0.0, no exact match of 0%
    text = (run / "report.md").read_text()
    assert "0.0000" not in text and "0.0%" not in text


def test_report_for_a_fedbpt_shaped_run(tmp_path):
    """FedBPT's records and summary: dev metrics per round, zero / best / final prompts on dev and test."""
    run = tmp_path / "bpt"
    run.mkdir()
    C.save(C.load(None, ["run.algorithm='fedbpt'"]), run / "config.toml")
    with open(run / "metrics.jsonl", "w") as f:
        for r in (1, 2):
            f.write(json.dumps({"round": r, "clients": [{"id": "client_000", "train_loss": 0.7 / r, "bytes_down": 4200,
                                                         "bytes_up": 4300}], "dropped": [],
                                "eval": {"dev_metric": "accuracy", "dev_accuracy": 0.5 + r / 10, "dev_loss": 0.69 - r / 10,
                                         "dev_rows": 32, "dev_score": 0.5 + r / 10},
                                "bytes_down": 4200, "bytes_up": 4300, "round_seconds": 2.0}) + "\n")
    ev = lambda a, l: {"metric": "accuracy", "accuracy": a, "loss": l, "rows": 32, "score": a}
    (run / "summary.json").write_text(json.dumps({
        "algorithm": "fedbpt", "rounds": 2, "seconds": 5.0,
        "zero_prompt": {"dev": ev(0.5, 0.69), "test": ev(0.52, 0.7)},
        "best": {"round": 2, "dev": ev(0.7, 0.49), "test": ev(0.66, 0.55)},
        "final": {"round": 2, "dev": ev(0.7, 0.49), "test": ev(0.66, 0.55)}}))
    (run / "plots").mkdir()
    (run / "plots" / "fedbpt_rounds.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = write_report(run).read_text()
    assert "| prompt | round | dev accuracy | dev loss | test accuracy | test loss |" in text
    assert "| zero prompt | 0 | 50.0% | 0.6900 | 52.0% | 0.7000 |" in text
    assert "| best by dev | 2 | 70.0% | 0.4900 | 66.0% | 0.5500 |" in text
    assert "held-out dev_accuracy" in text and "dev_score" not in text and "dev_rows" not in text
    assert "![fedbpt_rounds.png](plots/fedbpt_rounds.png)" in text  # a recipe's own plot is kept
    _png_size(run / "plots" / "client_train_loss.png")


def test_the_console_table_lists_categories_only_when_there_are_several():
    from rich.console import Console

    from fedtune.summary_console import print_summary

    def text(final):
        console = Console(record=True, width=200)
        print_summary({"algorithm": "fedit", "rounds": 2, "seconds": 1.0, "final": final,
                       "base": {"loss": 1.5, "exact_match": 0.0}}, console)
        return console.export_text()

    one = text({"loss": 1.25, "exact_match": 0.5, "exact_match_by_category": {"all": 0.5}})
    assert one.count("all") == 1 and "1.2500" in one  # before: a second "all" row with no loss
    two = text({"loss": 1.25, "exact_match": 0.5, "exact_match_by_category": {"qa": 0.25, "math": 0.75},
                "loss_by_category": {"qa": 1.0, "math": 1.5}})
    assert "qa" in two and "math" in two and "25.0%" in two and "75.0%" in two and "all" in two

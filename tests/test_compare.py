"""`fedtune compare` on a tiny random Llama: every variant, equal budgets, the table."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fedtune import config as C
from fedtune.compare import build_table, run_compare


def _tiny(model, *extra):
    return [f"model.name={json.dumps(str(model))}", "model.autocast='off'", "data.demo_rows_per_skill=16",
            "partition.num_clients=3", "partition.test_per_category=2", "train.batch_size=2",
            "train.micro_batch_size=2", "eval.max_new_tokens=3", "run.progress=false", *extra]


def test_compare_command_runs_every_variant_at_an_equal_budget(tiny_llama, tmp_path):
    out = tmp_path / "cmp"
    args = []
    for o in _tiny(tiny_llama, "run.rounds=2", "train.max_steps=2"):
        args += ["--set", o]
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "compare", "--out", str(out), *args, "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # the printed table: a row per variant, a column per category and overall
    for name in ("base", "local client_000", "local client_002", "local (mean)", "centralized", "federated"):
        assert name in r.stdout
    assert "held-out loss" in r.stdout and "ROUGE-L" in r.stdout and "arithmetic" in r.stdout
    doc = json.loads((out / "compare.json").read_text())
    assert doc["budget"]["optimizer_steps"] == 2 * 3 * 2 and doc["budget"]["steps_by_round"] == [6, 6]
    trained = {k: v for k, v in doc["variants"].items() if k != "base"}
    assert sorted(trained) == ["centralized", "federated", "local client_000", "local client_001",
                               "local client_002"]
    for name, v in trained.items():  # equal budgets: the same optimizer steps and examples
        assert v["budget"]["optimizer_steps"] == 12 and v["budget"]["examples"] == 24, name
    assert doc["variants"]["base"]["budget"]["optimizer_steps"] == 0
    # per category and overall, for each metric, every variant
    loss = doc["table"]["loss"]
    assert set(loss["federated"]) == {"arithmetic", "date_format", "sort_numbers", "to_json", "unit_conversion",
                                      "uppercase", "all"}
    assert loss["local (mean)"]["all"] == pytest.approx(
        sum(loss[f"local client_00{i}"]["all"] for i in range(3)) / 3)
    assert "rouge_l" in doc["table"] and "exact_match" in doc["table"]
    md = (out / "compare.md").read_text()
    assert "## held-out loss" in md and "| federated |" in md and "12 optimizer steps of 2" in md
    assert (out / "plots" / "compare_loss.png").is_file()
    for folder in ("federated", "centralized", "local_client_001"):
        assert (out / folder / "report.md").is_file() and (out / folder / "adapter" / "adapter_config.json").is_file()
        recs = [json.loads(x) for x in (out / folder / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in recs] == [1, 2]
    # local-only trains one client on its own rows only; centralized on all rows pooled
    s_local = json.loads((out / "local_client_001" / "summary.json").read_text())
    s_central = json.loads((out / "centralized" / "summary.json").read_text())
    assert list(s_local["client_sizes"]) == ["client_001"]
    assert s_central["client_sizes"]["pooled"] == sum(doc["clients"].values())


def test_equal_budget_with_partial_participation_and_epochs(tiny_llama, tmp_path):
    """Clients of unequal size, 2 of 3 per round, epochs-based local steps: the per-round
    step count varies, and every trained variant follows it exactly."""
    cfg = C.load(None, _tiny(tiny_llama, "run.rounds=2", "train.epochs=0.1", "partition.method='dirichlet'",
                             "partition.min_client_size=5", "server.clients_per_round=2",
                             "compare.variants=['local', 'centralized', 'federated']", "compare.local_clients=1",
                             "eval.generate=false"))
    doc = run_compare(cfg, tmp_path)
    b = doc["budget"]
    assert len(b["steps_by_round"]) == 2 and sum(b["steps_by_round"]) == b["optimizer_steps"]
    assert sorted(doc["variants"]) == ["centralized", "federated", "local client_000"]
    for name, v in doc["variants"].items():
        assert v["budget"]["optimizer_steps"] == b["optimizer_steps"], name
    fed_recs = [json.loads(x) for x in (tmp_path / "federated" / "metrics.jsonl").read_text().splitlines()]
    assert [sum(c["steps"] for c in r["clients"]) for r in fed_recs] == b["steps_by_round"]
    assert all(len(r["clients"]) == 2 for r in fed_recs)
    assert "rouge_l" not in doc["table"] and "loss" in doc["table"]


def test_build_table_orders_variants_and_averages_locals():
    fin = lambda x: {"final": {"loss": x, "loss_by_category": {"a": x, "b": x + 1}}}
    t = build_table({"base": fin(3.0), "local c0": fin(2.0), "local c1": fin(1.0), "federated": fin(0.5)}, ["a", "b"])
    assert list(t["loss"]) == ["base", "local c0", "local c1", "local (mean)", "federated"]
    assert t["loss"]["local (mean)"] == {"a": 1.5, "b": 2.5, "all": 1.5}


def test_compare_with_the_llm_judge_on_a_fake_endpoint(tiny_llama, tmp_path):
    from test_eval_judge import FakeJudge

    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "turns": [f"Question {i}?"]}) + "\n" for i in range(3)))
    with FakeJudge() as srv:
        cfg = C.load(None, _tiny(tiny_llama, "run.rounds=1", "train.max_steps=1", "eval.generate=false",
                                 "compare.variants=['base', 'federated']", f"judge.endpoint='{srv.url}'",
                                 "judge.model='fake'", f"judge.questions='{qfile}'", "judge.max_new_tokens=3"))
        doc = run_compare(cfg, tmp_path / "cmp")
        n_requests = len(srv.requests)
    j = doc["judge"]
    assert j["questions"] == 3 and set(j["scores"]) == {"base", "federated"}
    for s in j["scores"].values():  # the tiny model never writes 'good': every answer rated 3
        assert s == {"judge_score": 3.0, "judge_scored": 3, "judge_errors": 0}
    assert j["pairwise"] == {"base": {"win": 0.0, "tie": 1.0, "loss": 0.0, "judged": 3, "errors": 0}}
    assert n_requests == 3 * 2 + 3 * 2  # single: 3 per variant; pairwise: 3 questions x both orders
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## LLM judge (fake, 3 questions)" in md and "| base | 0.0% | 100.0% | 0.0% | 3 | 0 |" in md


def test_compare_runs_the_federated_variant_once_per_listed_algorithm(tiny_llama, tmp_path):
    cfg = C.load(None, _tiny(tiny_llama, "run.rounds=1", "train.max_steps=1", "eval.generate=false",
                             "compare.variants=['federated']",
                             "compare.algorithms=['fedavg', 'scaffold', 'fedprox', 'flexlora_svd', 'ffa_lora', "
                             "'hetlora', 'flexlora_het', {name='fedavgm_lr3', algorithm='fedavgm', "
                             "set={server={server_lr=3.0, momentum=0.0}}}]"))
    out = tmp_path / "cmp"
    out.mkdir()
    doc = run_compare(cfg, out)
    names = ["federated fedavg", "federated scaffold", "federated fedprox", "federated flexlora_svd",
             "federated ffa_lora", "federated hetlora", "federated flexlora_het", "federated fedavgm_lr3"]
    assert sorted(doc["variants"]) == sorted(names)
    assert all(doc["variants"][n]["budget"]["optimizer_steps"] == 3 for n in names)  # the same budget each
    assert list((out / "federated_scaffold" / "client_state").rglob("*.safetensors"))
    svd = [json.loads(x) for x in (out / "federated_flexlora_svd" / "metrics.jsonl").read_text().splitlines()]
    assert "discarded_energy" in svd[0]["aggregate"]
    het = [json.loads(x) for x in (out / "federated_hetlora" / "metrics.jsonl").read_text().splitlines()]
    sent = sorted({c["bytes_down"] for c in het[0]["clients"]})
    assert len(sent) == min(3, len(het[0]["clients"]))  # ranks r/4, r/2, r: three message sizes
    # the entry table: FedAvgM with momentum 0 and server lr 3 is x + 3 (mean - x): from B = 0, 3x FedAvg's B
    from safetensors.numpy import load_file

    saved = C.load(out / "federated_fedavgm_lr3" / "config.toml")
    assert (saved.server.aggregation, saved.server.server_lr, saved.server.momentum) == ("fedavgm", 3.0, 0.0)
    avg = load_file(out / "federated_fedavg" / "adapter" / "adapter_model.safetensors")
    lr3 = load_file(out / "federated_fedavgm_lr3" / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in avg if "lora_B" in k]
    assert b_keys and all(np.abs(avg[k]).max() > 0 for k in b_keys)
    for k in b_keys:
        np.testing.assert_allclose(lr3[k], 3.0 * avg[k], rtol=1e-5, atol=1e-7)
    md = (out / "compare.md").read_text()
    assert "[federated fedavgm_lr3](federated_fedavgm_lr3/report.md)" in md
    with pytest.raises(Exception, match="compare.algorithms: .krum.: .* needs at least 5 clients per round"):
        run_compare(C.load(None, _tiny(tiny_llama, "compare.algorithms=['krum']")), tmp_path / "bad")


class _Cut(Exception):
    """Stands for a crash: raised after a round was evaluated, before its checkpoint."""


def test_compare_resume_reads_finished_variants_and_continues_a_cut_one(tiny_llama, tmp_path, monkeypatch):
    import fedtune.compare as cmp

    cfg = C.load(None, _tiny(tiny_llama, "run.rounds=2", "train.max_steps=2", "eval.generate=false",
                             "compare.variants=['base', 'centralized', 'federated']"))
    ref = run_compare(cfg, tmp_path / "ref")  # the same comparison, never interrupted
    real = cmp.Simulator

    def crash_in_federated_round_2(strategy, app, ids, settings, *, on_round_end, **kw):
        def end(rnd, arrays, record):
            on_round_end(rnd, arrays, record)
            if ids != ["pooled"] and rnd == 2:
                raise _Cut()
        return real(strategy, app, ids, settings, on_round_end=end, **kw)

    monkeypatch.setattr(cmp, "Simulator", crash_in_federated_round_2)
    out = tmp_path / "cmp"
    with pytest.raises(_Cut):
        run_compare(cfg, out)
    assert (out / "centralized" / "summary.json").is_file() and (out / "base.json").is_file()
    assert not (out / "federated" / "summary.json").exists()
    started = []

    def record_starts(strategy, app, ids, settings, **kw):
        sim = real(strategy, app, ids, settings, **kw)
        run = sim.run
        sim.run = lambda state=None: (started.append((ids, state.round if state else 0)), run(state))[1]
        return sim

    monkeypatch.setattr(cmp, "Simulator", record_starts)
    monkeypatch.setattr(cmp.FedIT, "evaluate_adapter", _counting(cmp.FedIT.evaluate_adapter, evals := []))
    doc = run_compare(cfg, out, resume=True)
    # centralized and base were read back; only the federated variant ran, from round 1's checkpoint
    assert started == [(sorted(doc["clients"]), 1)]
    assert len(evals) == 1  # the federated run's round 2 (base.json held the base model's scores)
    recs = [json.loads(x) for x in (out / "federated" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    assert json.loads((out / "federated" / "summary.json").read_text())["resumed_after_round"] == 1
    assert list(doc["variants"]) == ["base", "centralized", "federated"]
    assert doc["table"] == ref["table"]  # the numbers of the run that never stopped
    # a folder kept for its results alone (no checkpoint, no adapter) is still read back, not retrained
    import shutil

    for folder in ("centralized", "federated"):
        shutil.rmtree(out / folder / "checkpoint")
        shutil.rmtree(out / folder / "adapter")
    started.clear()
    assert run_compare(cfg, out, resume=True)["table"] == ref["table"] and started == []


def _counting(fn, calls: list):
    def wrapped(*a, **kw):
        calls.append(1)
        return fn(*a, **kw)
    return wrapped


def test_compare_resume_refuses_a_changed_setting(tiny_llama, tmp_path):
    from fedtune.compare import _same_config
    from fedtune.config_resume import COMPARE_RESUMABLE, for_resume
    from fedtune.errors import ConfigError, FedtuneError

    cfg = C.load(None, _tiny(tiny_llama))
    C.save(C.load(None, _tiny(tiny_llama, "train.lr=0.5")), tmp_path / "config.toml")
    with pytest.raises(FedtuneError, match=r"config.toml: this variant was run with other settings \(train.lr\)"):
        _same_config(cfg, tmp_path)
    C.save(C.load(None, _tiny(tiny_llama, "compare.algorithms=['fedavgm']", "judge.max_questions=3")), tmp_path / "config.toml")
    _same_config(cfg, tmp_path)  # which variants a comparison holds, and its judge, do not change a variant
    assert for_resume(cfg, ["compare.algorithms=['fedavgm']"], "x", COMPARE_RESUMABLE).compare.algorithms == ["fedavgm"]
    with pytest.raises(ConfigError, match="--resume: train.lr cannot change"):
        for_resume(cfg, ["train.lr=0.5"], "x", COMPARE_RESUMABLE)


def test_compare_cli_resume_reads_a_finished_comparison_back(tiny_llama, tmp_path):
    out = tmp_path / "cmp"
    args = []
    for o in _tiny(tiny_llama, "run.rounds=1", "train.max_steps=1", "eval.generate=false",
                   "compare.variants=['base', 'federated']"):
        args += ["--set", o]
    cli = [sys.executable, "-m", "fedtune.cli", "compare"]
    first = subprocess.run(cli + ["--out", str(out), *args], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    table = json.loads((out / "compare.json").read_text())["table"]
    again = subprocess.run(cli + ["--out", str(out), *args], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and f"continue it with --resume {out}" in again.stderr
    bad = subprocess.run(cli + ["--resume", str(out), "--set", "train.lr=0.5"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "train.lr cannot change" in bad.stderr
    resumed = subprocess.run(cli + ["--resume", str(out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "base: read from" in resumed.stdout and "federated: finished in an earlier run" in resumed.stdout
    assert json.loads((out / "compare.json").read_text())["table"] == table  # nothing retrained, the same table


@pytest.mark.parametrize("entry, message", [
    ("{algorithm='fedavgm', set={train={max_steps=3}}}", r"compare.algorithms\[1\] \('fedavgm'\): set.train.max_steps may "
                                                         "not differ between the variants"),
    ("{algorithm='fedavgm', set={server={fraction=0.5}}}", "set.server.fraction may not differ"),
    ("{algorithm='fedavgm', sett={}}", r"unknown key\(s\) \['sett'\]"),
    ("{algorithm='fedavm'}", "unknown algorithm 'fedavm' \\(did you mean 'fedavgm'\\?\\)"),
    ("{name='a/b', algorithm='fedavgm'}", "letters, digits and _ . \\+ - only"),
    ("'fedavg'", r"compare.algorithms\[1\]: a second variant named 'fedavg'"),
])
def test_compare_algorithm_entries_are_checked_by_key(entry, message):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        C.load(None, [f"compare.algorithms=['fedavg', {entry}]"])

"""Checkpoint and resume: the federated state survives a crash at any point, and a resumed
run ends exactly (bit for bit) where an uninterrupted run with the same seed ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.core.arrays import pack
from fedtune.core.strategy import FitRes
from fedtune.engines.faults import FaultInjector
from fedtune.core.checkpoint import exists as has_checkpoint
from fedtune.core.checkpoint import load as load_checkpoint
from fedtune.core.checkpoint import save as save_checkpoint
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.errors import FedtuneError
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"m.lora_A.weight": (3, 6), "m.lora_B.weight": (6, 3)}
TIMING_KEYS = {"seconds", "round_seconds", "wall_time", "eval_seconds", "train_seconds", "compute_seconds"}


def _initial():
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


class NoisyClients:
    """Each (round, client) draws its update from its own seed, as FedIT does."""

    def __init__(self, n, crash_at=None):
        self.ids = [f"c{i}" for i in range(n)]
        self.crash_at = crash_at  # (round, client): die there, like a SIGKILL in the middle of a round

    def fit(self, cid, ins):
        rnd = ins.config["round"]
        if (rnd, cid) == self.crash_at:
            raise KeyboardInterrupt  # not an Exception: nothing in the engine may catch it
        rng = np.random.default_rng([7, rnd, self.ids.index(cid)])
        out = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in ins.arrays.items()}
        return FitRes(cid, out, 5 + self.ids.index(cid), {"train_loss": float(rng.random())})


def _sim(run_dir, clients, rounds):
    strat = FedAvgStrategy(_initial(), seed=3, clients_per_round=4, aggregation="fedadam", server_lr=0.1)
    sim = Simulator(strat, clients, clients.ids, SimulatorSettings(rounds=rounds, min_clients=3, progress=False),
                    run_dir=run_dir, faults=FaultInjector(0.3, seed=1, kinds=("raise", "disappear")),
                    evaluate=lambda rnd, a: {"norm": float(sum(np.sum(v.astype(np.float64) ** 2) for v in a.values()))})
    return sim, strat


def _strip(rec):
    """A metrics record without wall-clock timings (which differ between runs)."""
    if isinstance(rec, dict):
        return {k: _strip(v) for k, v in rec.items() if k not in TIMING_KEYS and k != "traceback"}
    if isinstance(rec, list):
        return [_strip(v) for v in rec]
    return rec


def test_crash_mid_round_and_resume_equals_the_uninterrupted_run(tmp_path):
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir(), crash_dir.mkdir()
    sim, ref_strat = _sim(ref_dir, NoisyClients(6), rounds=6)
    ref = sim.run()

    sim, _ = _sim(crash_dir, NoisyClients(6, crash_at=(4, ref.history[3]["selected"][1])), rounds=6)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    assert json.loads((crash_dir / "checkpoint" / "state.json").read_text())["round"] == 3

    sim, strat = _sim(crash_dir, NoisyClients(6), rounds=6)  # a fresh process: new strategy, new engine
    state = load_checkpoint(crash_dir, strat)
    assert state.round == 3 and strat.steps == 3
    resumed = sim.run(state)

    assert all(np.array_equal(resumed.global_arrays[k], ref.global_arrays[k]) for k in SHAPES)  # bit for bit
    for k in ref_strat.m:  # the server optimizer state too
        assert np.array_equal(strat.m[k], ref_strat.m[k]) and np.array_equal(strat.v[k], ref_strat.v[k])
    assert any(r["dropped"] for r in ref.history)  # the seeded faults were met again after the resume
    recs = [json.loads(line) for line in (crash_dir / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5, 6]  # each round once
    assert _strip(recs) == _strip(ref_recs)


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    sim, strat = _sim(tmp_path, NoisyClients(6), rounds=2)
    sim.run()
    ck = tmp_path / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["algorithm.safetensors", "global.safetensors", "state.json",
                                                    "strategy.safetensors"]
    assert not list(tmp_path.glob("checkpoint.*"))  # no temporary or old folder left behind
    for name in ("global.safetensors", "strategy.safetensors"):
        raw = (ck / name).read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        json.loads(raw[8:8 + header_len])  # a safetensors header is plain JSON; nothing here unpickles
        assert not raw.startswith(b"\x80")  # not a pickle stream
    assert set(load_file(str(ck / "global.safetensors"))) == set(SHAPES)
    assert set(load_file(str(ck / "strategy.safetensors"))) == {f"{p}/{k}" for p in "mv" for k in SHAPES}
    meta = json.loads((ck / "state.json").read_text())
    assert meta["round"] == 2 and meta["strategy"] == {"steps": 2}
    assert [len(h["selected"]) for h in meta["history"]] == [4, 4]  # the selection history


def test_a_crash_at_any_step_of_a_save_leaves_a_readable_checkpoint(tmp_path, monkeypatch):
    """Crash the save of round 3's checkpoint at each of its file-system steps in turn (every
    rename, removal, fsync and file write): loading then gives round 2 or round 3, whole, and
    the run saves and loads normally afterwards."""
    import fedtune.core.atomic as atomic

    sim, strat = _sim(tmp_path / "ref", NoisyClients(6), rounds=3)
    (tmp_path / "ref").mkdir()
    states = {}
    sim.driver.hooks = None
    for rounds in (2, 3):
        sim.driver.s.rounds = rounds
        states[rounds] = sim.run(states.get(2))

    class Boom(Exception):
        pass

    real = {"rename": atomic.os.rename, "rmtree": atomic.shutil.rmtree, "fsync": atomic.os.fsync}
    steps_seen, k = [], 0
    while True:
        run = tmp_path / f"crash{k}"
        run.mkdir()
        save_checkpoint(run, states[2], strat)
        calls = [0]

        def step(name):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == k + 1:
                    raise Boom(name)
                return real[name](*a, **kw)
            return wrapped

        for name in real:
            monkeypatch.setattr(atomic.os if name in ("rename", "fsync") else atomic.shutil, name, step(name))
        try:
            save_checkpoint(run, states[3], strat)
            crashed = False
        except Boom:
            crashed = True
        finally:
            monkeypatch.undo()
        fresh = _sim(run, NoisyClients(6), rounds=3)[1]
        loaded = load_checkpoint(run, fresh)
        assert loaded.round in (2, 3), (k, loaded.round)
        want = states[loaded.round].global_arrays
        assert all(np.array_equal(loaded.global_arrays[key], want[key]) for key in want), k
        save_checkpoint(run, states[3], strat)  # and the next save works
        assert load_checkpoint(run, fresh).round == 3
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
        steps_seen.append(loaded.round)
        if not crashed:
            break
        k += 1
    assert k >= 5 and 2 in steps_seen and 3 in steps_seen, (k, steps_seen)  # both outcomes were met


@pytest.mark.parametrize("damage,expect", [
    (lambda ck: (ck / "state.json").write_text("{not json"), "state.json.*|checkpoint is unreadable"),
    (lambda ck: (ck / "state.json").write_text('{"round": 2}'), r"state.json: not a fedtune checkpoint"),
    (lambda ck: (ck / "state.json").write_bytes(b"\xff\xfe"), "checkpoint is unreadable"),
    (lambda ck: (ck / "global.safetensors").write_bytes((ck / "global.safetensors").read_bytes()[:50]),
     "checkpoint is unreadable.*safetensors"),
    (lambda ck: (ck / "global.safetensors").write_bytes(pack({"m.lora_A.weight": np.zeros((2, 2), np.float32)})),
     r"global.safetensors: the checkpoint does not fit this run's model and config"),
    (lambda ck: (ck / "strategy.safetensors").unlink(), "checkpoint is unreadable"),
])
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage, expect):
    sim, _ = _sim(tmp_path, NoisyClients(6), rounds=2)
    sim.run()
    damage(tmp_path / "checkpoint")
    with pytest.raises(FedtuneError, match=expect):
        load_checkpoint(tmp_path, _sim(tmp_path, NoisyClients(6), rounds=2)[1])


def test_no_checkpoint_is_a_clear_error(tmp_path):
    assert not has_checkpoint(tmp_path)
    with pytest.raises(FedtuneError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path, _sim(tmp_path, NoisyClients(6), rounds=1)[1])


# ---------------------------------------------------------------------------- the real thing: SIGKILL a FedIT run


def _run_args(model):
    # 40 local steps: a round of the tiny model then takes most of a second, long enough for the
    # kill below to land inside round 2 (with 4 steps a round took 50-80 ms on an idle machine)
    return ["--set", f"model.name={json.dumps(str(model))}", "--set", "model.autocast='off'",
            "--set", "data.demo_rows_per_skill=24", "--set", "partition.num_clients=3",
            "--set", "partition.test_per_category=2", "--set", "train.max_steps=40", "--set", "train.batch_size=4",
            "--set", "train.micro_batch_size=2", "--set", "run.rounds=3", "--set", "eval.generate=false",
            "--set", "eval.compare_base=false", "--set", "server.aggregation='fedadam'",
            "--set", "server.server_lr=0.01", "--set", "server.clients_per_round=2",
            "--set", "faults.probability=0.3", "--set", "faults.seed=2", "--set", "faults.kinds=['raise', 'disappear']",
            "--no-progress"]


def _fedtune(*args):
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rounds_in(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x)["round"] for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def test_sigkill_in_the_middle_of_a_round_then_resume_equals_an_uninterrupted_run(tiny_llama, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _fedtune("run", "--out", str(ref_dir), *_run_args(tiny_llama))  # runs alongside
    victim = _fedtune("run", "--out", str(run_dir), *_run_args(tiny_llama))
    try:
        # wait for round 1's checkpoint: from then on the process is training round 2
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint" / "state.json").exists():
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.02)
        # kill at once: round 1 is checkpointed and round 2 (2 x 40 local steps) is under way or about
        # to start; either way the process dies between two checkpoints, with no sleep to tune
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert _rounds_in(run_dir) == [1], "round 2 finished before the kill: make the rounds longer"
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] == 1

    resumed = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after round 1" in resumed.stdout
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, out + err

    # the final global adapter, the server optimizer state and every metric equal the uninterrupted run's
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(np.any(v != 0) for k, v in a.items() if "lora_B" in k)  # and training did move it
    for name in ("global.safetensors", "strategy.safetensors"):
        assert (run_dir / "checkpoint" / name).read_bytes() == (ref_dir / "checkpoint" / name).read_bytes()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3]  # each round once
    assert _strip(recs) == _strip(ref_recs)  # same clients, same drops, same losses, same held-out loss
    assert any(r["dropped"] for r in ref_recs)  # the seeded faults were met again after the resume

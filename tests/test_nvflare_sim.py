"""The NVIDIA FLARE engine in FLARE's simulator, on a tiny random Llama: parity with the
embedded simulator (same config and seed, same global adapter), site-local data with clear
errors for a missing or empty data path, and the site config rules."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import bpt_task

import nvflare  # noqa: E402,F401  (a pinned dependency: a broken install fails, never skips)

from fedtune import config as C  # noqa: E402
from fedtune.core import arrays as A  # noqa: E402
from fedtune.engines.nvflare import site as S  # noqa: E402
from fedtune.engines.nvflare import wire as W  # noqa: E402
from fedtune.errors import ConfigError, DataError  # noqa: E402


def _tiny(model, *extra):
    return [f"model.name={json.dumps(str(model))}", "model.autocast='off'", "data.demo_rows_per_skill=24",
            "partition.num_clients=3", "partition.test_per_category=2", "train.max_steps=2", "train.batch_size=4",
            "train.micro_batch_size=2", "eval.generate=false", "eval.compare_base=false", "run.rounds=2",
            "run.progress=false", "run.save_every_round=false", *extra]


# ----------------------------------------------------------------------------- parity


def _fault_seed(ids, per_round, seed=42) -> int:
    """A fault seed under which round 1 drops a selected client and every retry of it works."""
    from fedtune.core.selection import select_clients
    from fedtune.engines.faults import FaultInjector

    picked = select_clients(ids, 1, seed, count=per_round)
    for fs in range(200):
        f = FaultInjector(0.5, fs, ("raise", "disappear"))
        first = [f.draw(1, 0, c) for c in picked]
        if any(first) and all(f.draw(1, 1, c) is None for c, d in zip(picked, first) if d) and \
                not any(f.draw(2, 0, c) for c in ids):
            return fs
    raise AssertionError("no fault seed found")


def test_fedit_same_global_adapter_on_embedded_and_flare_simulator(tiny_llama, tmp_path):
    from fedtune.engines import nvflare
    from fedtune import runner

    # selection must match too, and a seeded injected fault drops a client in round 1 and its retry succeeds
    overrides = _tiny(tiny_llama, "server.clients_per_round=2", "server.min_clients=2", "server.round_retries=3",
                      f"faults.seed={_fault_seed(['client_000', 'client_001', 'client_002'], 2)}",
                      "faults.probability=0.5", "faults.kinds=['raise', 'disappear']")
    emb, flr = tmp_path / "embedded", tmp_path / "flare"
    emb.mkdir(), flr.mkdir()
    runner.run(C.load(None, overrides), emb)
    summary = runner.run(C.load(None, overrides + ["run.engine='nvflare'"]), flr)
    assert summary["engine"] == "nvflare" and summary["rounds"] == 2

    a = load_file(str(emb / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(flr / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert any(np.any(v != 0) for k, v in b.items() if "lora_B" in k)  # training moved B off zero

    ra = [json.loads(x) for x in (emb / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (flr / "metrics.jsonl").read_text().splitlines()]
    assert [r["selected"] for r in ra] == [r["selected"] for r in rb]
    assert len(rb[0]["selected"]) == 2
    for x, y in zip(ra, rb):
        assert [c["id"] for c in x["clients"]] == [c["id"] for c in y["clients"]]
        assert [c["examples"] for c in x["clients"]] == [c["examples"] for c in y["clients"]]
        np.testing.assert_allclose([c["train_loss"] for c in y["clients"]], [c["train_loss"] for c in x["clients"]],
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(y["eval"]["loss"], x["eval"]["loss"], rtol=0, atol=1e-6)
        assert y["bytes_down"] == x["bytes_down"] and y["bytes_up"] == x["bytes_up"]
        assert set(x) == set(y) and all(set(c) == set(d) for c, d in zip(x["clients"], y["clients"]))  # same records
        assert x["attempts"] == y["attempts"] and x["engine"] == "simulator" and y["engine"] == "nvflare"
        assert [(d["id"], d["attempt"], d["cause"], d["injected"]) for d in x["dropped"]] == \
               [(d["id"], d["attempt"], d["cause"], d["injected"]) for d in y["dropped"]]
    assert ra[0]["attempts"] > 1 and ra[0]["dropped"]  # the round with a drop and a retry
    # each simulated site was launched once and kept its model across rounds
    log = (flr / "nvflare" / "simulator.log").read_text()
    for site in ("client_000", "client_001", "client_002"):
        assert log.count(f"fedtune site {site}: data ") == 1
    # the job the server ran carries no data path
    job = json.loads(next((flr / "nvflare" / "workspace" / "server").rglob("fedtune_job.json")).read_text())
    assert job["config"]["data"]["path"] == ""
    # collecting the server's results (as from a deployment) gives the same adapter, in PEFT's format
    nvflare.collect(flr / "nvflare" / "workspace" / "server" / "simulate_job", tmp_path / "collected")
    c = load_file(str(tmp_path / "collected" / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(c[k], b[k]) for k in b)
    assert (tmp_path / "collected" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra", [["server.aggregation='scaffold'", "train.prox_mu=0.1"],
                                   # heterogeneous ranks: each site trains its own rank's adapter over the FLoRA
                                   # stack of every earlier round (the stack travels with the fresh adapter)
                                   ["server.lora_aggregation='stack'", "lora.r=4", "lora.client_ranks=[2, 4]"],
                                   # FedYogi over secure aggregation with distributed DP: noise too small to see and
                                   # a clip that never binds give the same adapter, and the clients' clip and noise
                                   # shares travel in FLARE's round config (one FLARE start for the three). The noise
                                   # (std 1e-17, from the OS, different in each run) vanishes when a client's update is
                                   # cast to float32; at noise_multiplier 1e-12 (std 1e-9) it did not, and two runs of
                                   # one engine differed by ~3e-7 after round 2's AdamW (1.1e-5 once: Adam divides a
                                   # gradient near zero by its own size), which made this comparison flaky
                                   ["server.aggregation='fedyogi'", "server.server_lr=0.05", "secagg.enabled=true",
                                    "secagg.threshold=2", "privacy.mode='distributed'", "privacy.noise_multiplier=1e-20",
                                    "privacy.clip=1e3", "privacy.adaptive_clip=true"],
                                   # DP-SGD on each site (Opacus per-example gradients), noise too small to see, with
                                   # FedSA-LoRA: each site keeps its own B in its workspace
                                   ["server.aggregation='fedavgm'", "train.dpsgd_noise_multiplier=1e-15",
                                    "train.dpsgd_clip=1e3", "lora.personal_b=true"],
                                   # FedExP: the server step comes from each update's norm (no state across rounds);
                                   # the learning rate decays over the run, which each site places by run.rounds
                                   ["server.aggregation='fedexp'", "train.schedule_span='run'"]],
                         ids=["scaffold+fedprox", "flora+hetero-ranks", "fedyogi+secagg+distributed-dp", "dpsgd+fedsa",
                              "fedexp"])
def test_client_state_and_server_optimizers_give_the_same_adapter_on_both_engines(tiny_llama, tmp_path, extra):
    """SCAFFOLD's client control variates live on each FLARE site (and in the embedded run's
    folder); FedProx and FedYogi change only the client's loss and the server step."""
    from fedtune import runner

    overrides = _tiny(tiny_llama, *extra)
    emb, flr = tmp_path / "embedded", tmp_path / "flare"
    emb.mkdir(), flr.mkdir()
    runner.run(C.load(None, overrides), emb)
    runner.run(C.load(None, overrides + ["run.engine='nvflare'"]), flr)
    a = load_file(str(emb / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(flr / "adapter" / "adapter_model.safetensors"))
    for k in a:  # secure aggregation: the same up to its fixed-point encoding (2^-24 per value)
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    recs = [json.loads(x) for x in (flr / "metrics.jsonl").read_text().splitlines()]
    if "secagg.enabled=true" in extra:
        assert all(r["exchanges"] == 4 and r["aggregate"]["secagg"]["survivors"] == 3 for r in recs)
    if "train.dpsgd_noise_multiplier=1e-15" in extra:
        assert [r["dpsgd"]["steps_max"] for r in recs] == [2, 4] and recs[1]["dpsgd"]["epsilon_max"] > 0
    if "privacy.mode='distributed'" in extra:
        dp = [r["aggregate"]["dp"] for r in recs]
        assert [d["noise_shares"] for d in dp] == [3, 3] and dp[1]["epsilon"] > dp[0]["epsilon"] > 0
        assert dp[1]["clip"] == pytest.approx(dp[0]["next_clip"])  # the adapted clip reached the sites
    sa = A.unpack((emb / "checkpoint" / "strategy.safetensors").read_bytes())
    sb = A.unpack((flr / "checkpoint" / "strategy.safetensors").read_bytes())
    stateless = "server.lora_aggregation='stack'" in extra or "server.aggregation='fedexp'" in extra
    assert sorted(sa) == sorted(sb) and (sa or stateless)  # c, or m and v
    if "server.aggregation='fedexp'" in extra:  # the same extrapolated step, every round, on both engines
        erecs = [json.loads(x) for x in (emb / "metrics.jsonl").read_text().splitlines()]
        for key in ("server_lr", "fedexp_ratio"):  # the step, and the norm ratio it is the floor-1 max of
            want = [r["aggregate"][key] for r in erecs]
            assert len(want) == 2 and all(v > 0 for v in want)
            np.testing.assert_allclose([r["aggregate"][key] for r in recs], want, rtol=1e-6, err_msg=key)
    if "server.lora_aggregation='stack'" in extra:  # FLoRA's state is the stack in the global arrays
        ga = A.unpack((emb / "checkpoint" / "global.safetensors").read_bytes())
        gb = A.unpack((flr / "checkpoint" / "global.safetensors").read_bytes())
        assert sorted(ga) == sorted(gb) and json.loads((emb / "adapter" / "adapter_config.json").read_text())["r"] == 16
        for k in ga:
            np.testing.assert_allclose(gb[k], ga[k], rtol=0, atol=1e-6, err_msg=k)
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-6, err_msg=k)
    if "lora.personal_b=true" in extra:  # B stayed on each site
        assert list((flr / "nvflare" / "workspace").rglob("fedtune_client_state/*/r000002.safetensors"))
    if "scaffold" in extra[0]:
        assert len(list((emb / "client_state").rglob("*.safetensors"))) == 3 * 2  # 3 clients, 2 rounds kept
        assert list((flr / "nvflare" / "workspace").rglob("fedtune_client_state/*/r000002.safetensors"))


def test_resume_on_flare_continues_from_the_checkpoint(tiny_llama, tmp_path):
    """A FLARE run of 1 round, resumed with run.rounds = 2, ends where a 2-round embedded run ends."""
    from fedtune import runner

    base = _tiny(tiny_llama)
    emb, flr = tmp_path / "embedded", tmp_path / "flare"
    emb.mkdir(), flr.mkdir()
    runner.run(C.load(None, base), emb)  # 2 rounds
    first = C.load(None, base + ["run.rounds=1", "run.engine='nvflare'"])
    C.save(first, flr / "config.toml")
    runner.run(first, flr)
    assert json.loads((flr / "checkpoint" / "state.json").read_text())["round"] == 1
    from fedtune.config_resume import for_resume

    again = for_resume(C.load(flr / "config.toml"), ["run.rounds=2"], "config.toml")
    summary = runner.run(again, flr, resume=True)
    assert summary["rounds"] == 2 and (flr / "nvflare" / "workspace-2").is_dir()  # a second FLARE job
    a = load_file(str(emb / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(flr / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    recs = [json.loads(x) for x in (flr / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2] and all(r["engine"] == "nvflare" and "eval" in r for r in recs)


# ----------------------------------------------------------------------------- site-local data


def _run_job(tmp_path, model, sites: dict[str, Path], min_clients: int):
    """Build the job as `fedtune nvflare export` does and run it in FLARE's simulator with a
    site config naming each site's data path (as a deployment's sites do)."""
    from fedtune.engines.nvflare import job as J
    from fedtune.core.algorithm import get as get_algorithm

    cfg = C.load(None, _tiny(model, f"server.min_clients={min_clients}", "server.round_retries=0"))
    initial = get_algorithm("fedit").initial_arrays(cfg)
    site_cfg = tmp_path / "sites.toml"
    site_cfg.write_text("".join(f'[sites."{s}"]\ndata_path = {json.dumps(str(p))}\n' for s, p in sites.items()))
    job, stage = J.build_job(cfg, initial, f"{sys.executable} -u")
    ws = tmp_path / "ws"
    rc = J.simulate(job, ws, list(sites), len(sites), dict(os.environ, FEDTUNE_SITE_CONFIG=str(site_cfg)),
                    tmp_path / "sim.log", timeout=300)
    return ws / "server" / "simulate_job" / "fedtune", initial, rc


def test_too_few_sites_with_data_stops_the_run_with_a_clear_error(tiny_llama, tmp_path):
    """Each site without data fails with its name and path; below server.min_clients the run
    stops with one error naming every site's reason. (A site without data in a run that goes
    on is in test_nvflare_poc.py, on a real deployment.)"""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = tmp_path / "nowhere" / "b.jsonl"
    results, _, _ = _run_job(tmp_path, tiny_llama, {"site-a": empty, "site-b": missing}, min_clients=1)
    err = (results / "error.txt").read_text()
    assert "round 1: 0 client update(s) arrived" in err and "server.min_clients = 1" in err
    assert f"site-a: site 'site-a': data path {empty} is empty" in err
    assert f"site-b: site 'site-b': data path {missing} does not exist" in err
    assert not (results / "done.json").exists()


# ----------------------------------------------------------------------------- site config rules


def test_site_config_lookup_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(S.SITE_CONFIG_ENV, raising=False)
    ws = tmp_path / "site-1"
    (ws / "local").mkdir(parents=True)
    with pytest.raises(DataError, match=r"site 'site-1': no site config: write .*site-1/local/fedtune_site.toml"):
        S.read_site_settings("site-1", ws)
    # the startup kit's local/ folder; a relative data path is relative to the file
    (ws / "local" / S.SITE_CONFIG_FILE).write_text('[sites."site-1"]\ndata_path = "../data/x.jsonl"\n')
    s = S.read_site_settings("site-1", ws)
    assert s.data_path == (ws / "data" / "x.jsonl").resolve() and s.format is None
    with pytest.raises(DataError, match=r"site 'site-1': data path .*x.jsonl does not exist"):
        S.check_data_path(s)
    # another site's entry is not this site's
    with pytest.raises(DataError, match=r"site 'site-2': .* names no data_path for this site .*sites in the file: site-1"):
        S.read_site_settings("site-2", ws)
    # the environment variable wins; top-level keys serve whichever site reads the file
    other = tmp_path / "one.toml"
    other.write_text('data_path = "/srv/d.jsonl"\nformat = "dolly"\n')
    monkeypatch.setenv(S.SITE_CONFIG_ENV, str(other))
    s = S.read_site_settings("site-9", ws)
    assert s.data_path == Path("/srv/d.jsonl") and s.format == "dolly" and s.source == str(other)
    other.write_text('data_path = "/srv/d.jsonl"\nbatch = 3\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batch'\]"):
        S.read_site_settings("site-9", ws)
    monkeypatch.setenv(S.SITE_CONFIG_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(DataError, match=r"site config .*absent.toml .* does not exist"):
        S.read_site_settings("site-9", ws)


def test_only_the_site_decides_trust_remote_code_and_its_model(tmp_path, monkeypatch):
    """A job that asks for model.trust_remote_code does not get it on a site whose own config
    does not say so; the site's own model setting wins over the job's."""
    cfg = C.load(None, ["model.trust_remote_code=true", "model.name='org/from-the-job'"])
    site_file = tmp_path / "site.toml"
    site_file.write_text('data_path = "/srv/d.jsonl"\n')
    monkeypatch.setenv(S.SITE_CONFIG_ENV, str(site_file))
    s = S.read_site_settings("site-1", None)
    run = S.site_config(cfg, s)
    assert run.model.trust_remote_code is False and run.model.name == "org/from-the-job"
    site_file.write_text('data_path = "/srv/d.jsonl"\ntrust_remote_code = true\nmodel = "/srv/models/mine"\n')
    run = S.site_config(cfg, S.read_site_settings("site-1", None))
    assert run.model.trust_remote_code is True and run.model.name == "/srv/models/mine"
    site_file.write_text('data_path = "/srv/d.jsonl"\ntrust_remote_code = "yes"\n')
    with pytest.raises(ConfigError, match="trust_remote_code must be a bool"):
        S.read_site_settings("site-1", None)


def test_a_deployment_gets_a_finite_task_timeout_by_default():
    cfg = C.load(None)
    assert cfg.server.client_timeout == 0 and cfg.nvflare.task_timeout == 3600.0
    with pytest.raises(ConfigError, match="nvflare.task_timeout must be > 0"):
        C.load(None, ["nvflare.task_timeout=0"])


def test_on_the_wire_only_arrays_numbers_and_strings():
    """FLARE serializes a task with FOBS (msgpack; numpy arrays through np.save with
    allow_pickle=False): what fedtune sends comes back equal, and an object array cannot
    be sent at all."""
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    sent = FLModel(params={"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([0.5])},
                   meta={W.META_CONFIG: json.dumps({"round": 3, "es_seed": 7}), W.META_INDEX: 2})
    blob = fobs.dumps(FLModelUtils.to_shareable(sent))
    got = FLModelUtils.from_shareable(fobs.loads(blob))
    assert all(np.array_equal(got.params[k], v) and got.params[k].dtype == v.dtype for k, v in sent.params.items())
    assert got.meta[W.META_CONFIG] == sent.meta[W.META_CONFIG] and got.meta[W.META_INDEX] == 2
    assert list(W.plain_arrays(got.params)) == ["a", "b"]  # sorted, as the embedded simulator's unpack
    with pytest.raises(Exception, match="Object arrays cannot be saved when allow_pickle=False"):
        fobs.dumps(FLModelUtils.to_shareable(FLModel(params={"w": np.array([object()], dtype=object)})))


def test_replies_must_be_plain_arrays_and_numbers():
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedtune.engines.nvflare.wire import reply_to_fitres
    from fedtune.errors import UpdateRejected

    ok = FLModel(params={"w": np.ones(3, np.float32)},
                 meta={W.META_EXAMPLES: 4, W.META_METRICS: json.dumps({"train_loss": 1.5}), W.META_SECONDS: 0.1})
    res, seconds = reply_to_fitres("s", ok)
    assert res.num_examples == 4 and res.metrics == {"train_loss": 1.5} and seconds == 0.1
    for bad, msg in [({"w": [1.0, 2.0]}, "not a numeric numpy array"),
                     ({"w": np.array([object()], dtype=object)}, "not a numeric numpy array")]:
        with pytest.raises(UpdateRejected, match=msg):
            reply_to_fitres("s", FLModel(params=bad, meta=ok.meta))
    with pytest.raises(UpdateRejected, match="num_examples must be an integer"):
        reply_to_fitres("s", FLModel(params=ok.params, meta={W.META_EXAMPLES: "4"}))
    with pytest.raises(UpdateRejected, match="metrics must be numbers or strings"):
        reply_to_fitres("s", FLModel(params=ok.params, meta={W.META_EXAMPLES: 4, W.META_METRICS: '{"x": [1]}'}))
    from fedtune.engines.nvflare.controller import FlareTransport

    r = FlareTransport._reply("s", FLModel(params={}, meta={W.META_ERROR: "site 's': boom"}), 0)
    assert r.res is None and r.cause == "error" and r.reason == "site 's': boom"
    r = FlareTransport._reply("s", FLModel(params={"w": [1.0]}, meta=ok.meta), 0)
    assert r.res is None and r.cause == "rejected" and "not a numeric numpy array" in r.reason


# ----------------------------------------------------------------------------- FedBPT parity


def _bpt_task(tmp_path) -> list[str]:
    return bpt_task(tmp_path)


@pytest.mark.parametrize("extra", [["fedbpt.search=true", "task.word_candidates={0 = ['was', 'the'], 1 = ['the', 'was']}",
                                    "fedbpt.mean_lr=0.5",  # improved mode's server step: half way to the clients' mean
                                    "privacy.mode='central'", "privacy.noise_multiplier=1e-20", "privacy.clip=1e4"],
                                   # one generation per round, deep prompts layer by layer with acceptance (each site keeps
                                   # its copy), central DP on the clients' per-candidate loss vectors
                                   ["fedbpt.mode='generation'", "fedbpt.popsize=6", "fedbpt.minibatch=3", "fedbpt.deep=true",
                                    "fedbpt.deep_rounds_per_layer=1", "fedbpt.deep_accept=true", "privacy.mode='central'",
                                    "privacy.noise_multiplier=1e-20", "privacy.clip=1e4"]],
                         ids=["search+central-dp", "generation-deep+central-dp"])  # DP: noise too small to see (see the FedYogi case), a clip that never binds
def test_fedbpt_same_prompt_mean_on_embedded_and_flare_simulator(tiny_llama, tmp_path, extra):
    from fedtune.engines import nvflare
    from fedtune import runner

    ids = ["client_000", "client_001", "client_002"]
    overrides = _tiny(tiny_llama, "server.min_clients=3", "server.round_retries=3", "faults.probability=0.5",
                      f"faults.seed={_fault_seed(ids, 3)}", "faults.kinds=['raise', 'disappear']") \
        + _bpt_task(tmp_path) + list(extra)  # the case's own settings last (the task's start has search off)
    emb, flr = tmp_path / "embedded", tmp_path / "flare"
    emb.mkdir(), flr.mkdir()
    se = runner.run(C.load(None, overrides), emb)
    sf = runner.run(C.load(None, overrides + ["run.engine='nvflare'"]), flr)
    a = A.unpack((emb / "checkpoint" / "global.safetensors").read_bytes())
    b = A.unpack((Path(sf["nvflare"]["results"]) / "global.safetensors").read_bytes())
    assert sorted(a) == sorted(b) and np.linalg.norm(a["mean"]) > 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    for part in ("zero_prompt", "best", "final"):
        assert sf[part]["dev"]["loss"] == pytest.approx(se[part]["dev"]["loss"], abs=1e-6)
        assert sf[part]["test"]["accuracy"] == pytest.approx(se[part]["test"]["accuracy"], abs=1e-9)
    assert (flr / "prompt" / "prompt.json").is_file() and sf["selected"] == se["selected"] == "best"
    assert json.loads((flr / "prompt" / "prompt.json").read_text())["round"] == se["best"]["round"]
    ra = [json.loads(x) for x in (emb / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (flr / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb):
        assert x["selected"] == y["selected"] and x["bytes_up"] == y["bytes_up"] and x["attempts"] == y["attempts"]
        assert set(x) == set(y) and set(x["eval"]) == set(y["eval"])
        assert [(d["id"], d["attempt"], d["cause"]) for d in x["dropped"]] == \
               [(d["id"], d["attempt"], d["cause"]) for d in y["dropped"]]
        assert x["aggregate"]["sigma"] == pytest.approx(y["aggregate"]["sigma"], abs=1e-9)
        if "privacy.mode='central'" in extra:
            assert x["aggregate"]["dp"]["epsilon"] == pytest.approx(y["aggregate"]["dp"]["epsilon"])
            assert x["aggregate"]["dp"]["epsilon"] > 0
        if "fedbpt.mode='generation'" in extra:  # one generation of the global ES per round, every client's rows
            assert "rows" not in x["aggregate"] and "rows" not in y["aggregate"]  # under DP: not published
            assert x["aggregate"]["proposal_accepted"] == y["aggregate"]["proposal_accepted"]
            assert max(c["bytes_up"] for c in y["clients"]) < 1024
    if "fedbpt.search=true" in extra:  # chosen once, before round 1; the FLARE job ran the choice
        assert sf["search"] == se["search"]
        assert C.load(flr / "config.toml").task.verbalizer == se["search"]["verbalizer"]
    if "privacy.mode='central'" in extra:
        assert sf["privacy"]["epsilon"] == pytest.approx(se["privacy"]["epsilon"])
    # collecting the server's result as from a deployment, with the training file the dev rows are drawn
    # from: every round is evaluated again and the best-by-dev prompt is the one the run kept
    paths = [o for o in overrides if o.startswith(("task.train_path", "task.test_path"))]
    got = nvflare.collect(Path(sf["nvflare"]["results"]).parent, tmp_path / "collected", paths)
    assert got["selected"] == "best" and got["best"]["round"] == se["best"]["round"]
    z_run = load_file(str(emb / "prompt" / "prompt.safetensors"))["z"]
    z_col = load_file(str(tmp_path / "collected" / "prompt" / "prompt.safetensors"))["z"]
    np.testing.assert_allclose(z_col, z_run, rtol=0, atol=1e-6)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    import subprocess

    def fedtune(*args):
        return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=300)

    r = fedtune("nvflare", "--help")
    assert r.returncode == 0 and "export" in r.stdout and "collect" in r.stdout
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "x").write_text("")
    r = fedtune("nvflare", "export", "--out", str(tmp_path / "job"), "--set", "run.rounds=1")
    assert r.returncode == 2 and f"{tmp_path / 'job'} is not empty" in r.stderr and "Traceback" not in r.stderr
    r = fedtune("nvflare", "collect", str(tmp_path), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "no fedtune results" in r.stderr and "Traceback" not in r.stderr

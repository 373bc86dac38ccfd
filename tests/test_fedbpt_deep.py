"""Deep prompts (fedbpt.deep): the black box adds per-layer offsets at the prompt positions
exactly as a plain HF forward with the offset added to the previous layer's output; the
layer-by-layer server is per-layer CMA-ES on the pooled rows (cma by hand, bit for bit); a
client keeps its copy in sync from a few kilobytes a round and a stale copy is caught."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import bpt_task
from fedtune import config as C
from fedtune.errors import ConfigError
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.client import FedBPTClientApp, LocalSettings, Shard
from fedtune.fedbpt.deep import DeepProjection, transformer_layers
from fedtune.fedbpt.deep_strategy import DeepGenerationStrategy
from fedtune.fedbpt.encoded import Encoded
from fedtune.fedbpt.es import es_options
from fedtune.fedbpt.generation import candidates
from fedtune.fedbpt.prompt import ProjectionSpec


def _box(path, kind):
    from fedtune.config_schema import FedBPTSection, ModelSection
    from fedtune.fedbpt.loading import load_blackbox

    return load_blackbox(ModelSection(name=str(path), autocast="off"),
                         FedBPTSection(model_kind=kind, n_prompt_tokens=3, max_seq_len=64, forward_overhead_tokens=0))


def _oracle(box, model, enc, prompt, deep, label_ids):
    """Plain HF forwards, one row at a time: input embeddings with the prompt written in, and a
    forward hook on layer l-1 adding layer l's offset to its output at the prompt positions."""
    import torch

    layers = transformer_layers(model)
    out = []
    for i in range(len(enc)):
        n = int(enc.attention_mask[i].sum())
        ids = torch.as_tensor(enc.input_ids[i:i + 1, :n])
        s = int(enc.slot_start[i])
        pos = list(range(s, s + box.n_prompt_tokens))
        handles = []
        for li in range(1, len(layers)):
            def hook(mod, args, output, li=li):
                h = output[0] if isinstance(output, tuple) else output
                h[0, pos] += torch.as_tensor(deep[li - 1])
                return output
            handles.append(layers[li - 1].register_forward_hook(hook))
        with torch.inference_mode():
            x = model.get_input_embeddings()(ids).clone()
            x[0, pos] = box._slot_base + torch.as_tensor(prompt)
            logits = model(inputs_embeds=x).logits[0, int(enc.answer_pos[i])]
        for h in handles:
            h.remove()
        out.append(logits[label_ids].float().numpy())
    return np.stack(out)


@pytest.mark.parametrize("kind,template", [("causal", "<P> . {s} . It was <mask> ."),
                                           ("causal", "{s} . <P> . It was <mask> ."),  # shared context
                                           ("masked", "<P> . {s} . It was <mask> .")])
def test_deep_offsets_match_a_plain_forward_with_the_offset_added_to_the_previous_layer(
        tiny_llama, tiny_roberta, kind, template):
    from fedtune.fedbpt.tasks import TaskSpec

    box = _box(tiny_llama if kind == "causal" else tiny_roberta, kind)
    spec = TaskSpec("t", ("s",), "label", template, {"0": "was", "1": "the"})
    enc = box.encode_texts(spec, [("the movie was great",), ("bad",), ("It was good news",)])
    ids = box.label_token_ids(["was", "the"])
    rng = np.random.default_rng(0)
    n_layers = len(transformer_layers(box._model))
    prompts = rng.normal(0, 0.05, (4, 3, box.hidden_size)).astype(np.float32)
    deep = rng.normal(0, 0.5, (4, n_layers - 1, 3, box.hidden_size)).astype(np.float32)
    got = box.logits(prompts, enc, ids, deep)  # the whole population at once
    if "{s} . <P>" in template:
        assert box.shared_context_calls == 1
    for p in range(4):
        want = _oracle(box, box._model, enc, prompts[p], deep[p], ids)
        np.testing.assert_allclose(got[p], want, rtol=1e-4, atol=1e-5)
    plain = box.logits(prompts, enc, ids)  # no offsets: the hooks are idle, the deep part matters
    np.testing.assert_allclose(box.logits(prompts, enc, ids, np.zeros_like(deep)), plain, rtol=1e-5, atol=1e-6)
    assert box._hooks.live == [False] * (n_layers - 1)  # all-zero offsets: every hook skipped
    assert np.abs(plain - got).max() > 1e-4  # well above the 1e-5 agreement with the oracle
    with pytest.raises(ValueError, match="deep prompt offsets must have shape"):
        box.logits(prompts, enc, ids, deep[:, :, :2])


D, N_TOK, H, LAYERS = 500, 2, 4, 3


class DeepRowBox:
    """Logits that depend on the row alone, from the input prompt and every layer's offset."""

    pad_id = 0
    forward_calls = 0

    def logits(self, prompts, rows, label_ids, deep=None):
        self.forward_calls += 1
        w = np.stack([np.cos(np.arange(N_TOK * H * 2) * 0.02 * (1 + r[0] % 5)) for r in rows.input_ids])
        feats = prompts.reshape(len(prompts), 1, -1, 1) + deep.sum(axis=1).reshape(len(prompts), 1, -1, 1) ** 2
        return (feats * w.reshape(1, len(rows), -1, 2)).sum(axis=2)


def _shard(ids):
    n = len(ids)
    enc = Encoded(np.array([[i, 1] for i in ids], np.int64), np.ones((n, 2), np.int64), np.zeros(n, np.int64),
                  np.ones(n, np.int64), np.zeros((n, 2), bool))
    return Shard(enc, np.array([i % 2 for i in ids], np.int64))


SHARDS = {"c0": _shard([3, 4, 5]), "c1": _shard([6, 7, 8, 9, 10]), "c2": _shard([11, 12])}
PROJ = DeepProjection(ProjectionSpec(3, D, N_TOK, H, 0.5), [0.7, 2.0])


def _strategy():
    return DeepGenerationStrategy(n_layers=LAYERS, rounds_per_layer=2, intrinsic_dim=D, sigma0=0.6, seed=9,
                                  popsize=5, perturb=False)


def _sim(strat, app, rounds, state=None):
    return Simulator(strat, app, sorted(SHARDS), SimulatorSettings(rounds=rounds, progress=False)).run(state)


def _app(box=None):
    return FedBPTClientApp(box or DeepRowBox(), PROJ, SHARDS, [0, 1], LocalSettings(popsize=5, perturb=False), seed=1)


def _layer_es(layer):
    """The oracle's `cma` for one layer, built by hand with the seed rule of the docstring."""
    import cma

    return cma.CMAEvolutionStrategy(np.zeros(D), 0.6, es_options(
        9 + 0x44 * layer, popsize=5, CMA_diagonal=True, CMA_mirrors=0, verbose=-9,
        AdaptSigma=cma.sigma_adaptation.CMAAdaptSigmaCSA))


def test_layers_left_at_zero_draw_no_projection_and_the_others_use_their_seeded_std_rule():
    from fedtune.fedbpt.prompt import PROJECTION_STREAM, projection_std

    proj = DeepProjection(ProjectionSpec(3, D, N_TOK, H, 0.5), [0.7, 2.0])
    z = np.zeros((2, LAYERS, D), np.float32)
    z[:, 0] = 1.0
    first, deep = proj(z)
    assert not deep.any() and proj._A == {}  # only the input prompt is tuned: no A_l drawn, no product
    z[1, 2] = np.linspace(-1, 1, D)
    _, deep = proj(z)
    a2 = np.random.default_rng([3, PROJECTION_STREAM, 2]).standard_normal((N_TOK * H, D), dtype=np.float32)
    a2 *= np.float32(projection_std(2.0, D, 1.0, 1.0))  # layer 2 entry std 2.0, BBT's rule (alpha 1, sigma 1)
    np.testing.assert_allclose(deep[1, 1], (z[1, 2] @ a2.T).reshape(N_TOK, H), rtol=1e-5, atol=1e-6)
    assert not deep[0].any() and not deep[:, 0].any() and sorted(proj._A) == [2]


def test_layer_by_layer_generations_are_per_layer_cma_es_on_the_pooled_rows_bit_for_bit():
    strat = _strategy()
    state = _sim(strat, _app(), 8)
    box, z = DeepRowBox(), np.zeros((LAYERS, D), np.float32)
    ess = {}
    for rnd in range(1, 9):
        layer = ((rnd - 1) // 2) % LAYERS  # 0, 0, 1, 1, 2, 2, 0, 0
        es = ess[layer] if layer in ess else ess.setdefault(layer, _layer_es(layer))
        x = candidates(np.asarray(es.mean, np.float32), np.asarray(es.stds, np.float32), strat.round_seed(rnd), 5)
        zz = np.repeat(z[None].astype(np.float64), 5, axis=0)
        zz[:, layer] = x
        first, deep = PROJ(zz)
        total = np.zeros(5)
        for cid in sorted(SHARDS):
            total = total + O.ce_rows(box.logits(first, SHARDS[cid].enc, [0, 1], deep), SHARDS[cid].labels).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.inject(list(x), force=True)
            es.tell(es.ask(), list(total / 10))
        z[layer] = np.asarray(es.mean, np.float32)
    assert np.array_equal(state.global_arrays["layers"], z)
    assert [r["aggregate"]["layer"] for r in state.history] == [0, 0, 1, 1, 2, 2, 0, 0]
    # a few kilobytes a round: the active layer's mean and std, plus the layer just finished after a switch
    downs = [max(c["bytes_down"] for c in r["clients"]) for r in state.history]
    assert max(downs) < 8 * 1024 and downs[2] > downs[1] + 1900  # round 3 also carries layer 0
    assert max(c["bytes_up"] for r in state.history for c in r["clients"]) < 1024
    # resume by replay
    again = _strategy()
    again.load_state(*strat.state())
    assert np.array_equal(again.z, strat.z)


def test_a_client_with_a_stale_copy_fails_one_round_then_gets_the_whole_prompt():
    strat, app = _strategy(), _app()
    state = _sim(strat, app, 3)
    app.deep_cache.pop("c1")  # a restarted site: its copy of the deep prompt is gone
    state = _sim(strat, app, 5, state)
    r4, r5 = state.history[3], state.history[4]
    assert [d["id"] for d in r4["dropped"]] == ["c1"] and "digest" in r4["dropped"][0]["reason"]
    assert not r5["dropped"]
    b5 = {c["id"]: c["bytes_down"] for c in r5["clients"]}
    assert b5["c1"] > b5["c0"] + 1900  # layers 0 and 1 to c1, only layer 1 (changed in round 4) to c0


def test_a_deep_run_saves_a_prompt_that_classify_reads(tiny_llama, tmp_path):
    from fedtune import runner
    from fedtune.fedbpt.classify import classify

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", *bpt_task(tmp_path),
                        "partition.num_clients=2", "run.rounds=3", "run.progress=false", "fedbpt.mode='generation'",
                        "fedbpt.deep=true", "fedbpt.deep_rounds_per_layer=1", "fedbpt.popsize=4",
                        "fedbpt.select_on_dev=false"])
    (tmp_path / "run").mkdir()
    summary = runner.run(cfg, tmp_path / "run")
    assert summary["rounds"] == 3
    meta = json.loads((tmp_path / "run" / "prompt" / "prompt.json").read_text())
    assert meta["deep"]["layers"] == 2 and len(meta["deep"]["layer_stds"]) == 1
    rows = [("good news",), ("terrible movie",)]
    out = classify(tmp_path / "run" / "prompt", rows, cfg.model)
    assert [o["label"] for o in out] == [("1" if o["probs"]["the"] > o["probs"]["was"] else "0") for o in out]
    # the saved deep prompt is what the run evaluated: classify's probabilities match the session's scores
    from fedtune.fedbpt.prompt import load_prompt
    from fedtune.fedbpt.session import FedBPTModel
    from fedtune.fedbpt.tasks import task_from_config

    z, _, _ = load_prompt(tmp_path / "run" / "prompt")
    model = FedBPTModel(cfg, task_from_config(cfg.task))
    first, deep = model.prompt_of(z)
    lg = model.box.logits(first, model.box.encode_texts(model.spec, rows), model.label_ids, deep)[0]
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert [o["probs"]["the"] for o in out] == pytest.approx(p[:, 1].tolist(), abs=1e-4)
    with pytest.raises(ConfigError, match="fedbpt.deep = true .* runs in fedbpt.mode = 'generation'"):
        C.load(None, [*bpt_task(tmp_path), "fedbpt.deep=true"])
    with pytest.raises(ConfigError, match="fedbpt.deep_accept = true needs fedbpt.deep = true"):
        C.load(None, [*bpt_task(tmp_path), "fedbpt.mode='generation'", "fedbpt.deep_accept=true"])
    with pytest.raises(ConfigError, match="fedbpt.deep_layers needs fedbpt.deep = true"):
        C.load(None, [*bpt_task(tmp_path), "fedbpt.mode='generation'", "fedbpt.deep_layers=1"])
    from fedtune.fedbpt.session import build_strategy

    deep = [*bpt_task(tmp_path), "fedbpt.mode='generation'", "fedbpt.deep=true", f"model.name='{tiny_llama}'"]
    with pytest.raises(ConfigError, match=r"fedbpt.deep_layers = 99, but .* has 2 layers"):
        build_strategy(C.load(None, [*deep, "fedbpt.deep_layers=99"]), 2)
    assert build_strategy(C.load(None, [*deep, "fedbpt.deep_layers=1"]), 2).active(9) == 0


class SlopeBox(DeepRowBox):
    """Logit 0 for label 0 and s - 1 for label 1, s the sum of every prompt value: half the rows
    are each label, so the loss falls until s = 1 and rises after, and proposals can overshoot."""

    def logits(self, prompts, rows, label_ids, deep=None):
        self.forward_calls += 1
        s = prompts.reshape(len(prompts), -1).sum(1) + deep.reshape(len(prompts), -1).sum(1) - 1.0
        return np.stack([np.zeros((len(prompts), len(rows))), np.repeat(s[:, None], len(rows), 1)], axis=2)


def _pooled(zz):
    """Pooled mean ce of each deep prompt in zz (P, L, d) over every client's rows."""
    box, (first, deep) = SlopeBox(), PROJ(zz)
    total = sum(O.ce_rows(box.logits(first, SHARDS[c].enc, [0, 1], deep), SHARDS[c].labels).sum(axis=1)
                for c in sorted(SHARDS))
    return total / sum(len(s) for s in SHARDS.values())


def _accepting(tuned=0):
    return DeepGenerationStrategy(n_layers=LAYERS, rounds_per_layer=2, accept=True, intrinsic_dim=D, sigma0=0.6,
                                  seed=9, popsize=5, perturb=False, tuned_layers=tuned)


@pytest.mark.parametrize("tuned", [0, 1, 2])  # every layer; the input prompt alone; layers 0 and 1
def test_with_acceptance_a_layers_mean_enters_the_prompt_only_when_it_lowers_the_pooled_loss(tuned):
    strat = _accepting(tuned)
    state = _sim(strat, _app(SlopeBox()), 9)
    # oracle, from the rule as documented: per-layer CMA-ES on candidates over the accepted prompt; the
    # proposal (accepted prompt, last-told layer at its new mean) replaces it when its pooled loss is lower
    acc, ess, probe, taken = np.zeros((LAYERS, D), np.float32), {}, (0, np.zeros(D, np.float32)), []
    for rnd in range(1, 10):
        layer = ((rnd - 1) // 2) % (tuned or LAYERS)
        es = ess[layer] if layer in ess else ess.setdefault(layer, _layer_es(layer))
        x = candidates(np.asarray(es.mean, np.float32), np.asarray(es.stds, np.float32), strat.round_seed(rnd), 5)
        zz = np.repeat(acc[None].astype(np.float64), 5, axis=0)
        zz[:, layer] = x
        prop = acc.astype(np.float64)
        prop[probe[0]] = probe[1]
        f = _pooled(np.concatenate([zz, acc[None].astype(np.float64), prop[None]]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.inject(list(x), force=True)
            es.tell(es.ask(), list(f[:5]))
        taken.append(bool(f[6] < f[5]))
        if taken[-1]:
            acc[probe[0]] = probe[1]
        probe = (layer, np.asarray(es.mean, np.float32))
    assert np.array_equal(state.global_arrays["layers"], acc)
    assert [r["aggregate"]["layer"] for r in state.history] == [((r - 1) // 2) % (tuned or LAYERS) for r in range(1, 10)]
    assert not acc[tuned or LAYERS:].any()  # the layers past deep_layers keep their zero offset
    assert [r["aggregate"]["proposal_accepted"] for r in state.history] == taken
    assert any(taken[1:]) and not all(taken[1:])  # both branches taken (round 1's proposal is the zero prompt)
    # the accepted prompt's pooled loss never rises (no minibatch: the test is on every row)
    losses = [r["aggregate"]["fitness_accepted"] for r in state.history]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(float(_pooled(acc[None].astype(np.float64))[0]), rel=1e-9)
    # still a few kilobytes down: after a switch, mean + std + the proposal (an accepted one by reference)
    assert max(c["bytes_down"] for r in state.history for c in r["clients"]) < 8 * 1024
    again = _accepting(tuned)
    again.load_state(*strat.state())  # resume by replay reproduces the accepted prompt and the proposal
    assert np.array_equal(again.z, strat.z) and again.probe[0] == strat.probe[0]
    assert np.array_equal(again.probe[1], strat.probe[1])
    with pytest.raises(Exception, match="checkpoint was written with fedbpt mode 'generation-deep-accept'"):
        _strategy().load_state(*strat.state())
    with pytest.raises(Exception, match=r"this run is 'generation-deep-accept', 3 \(3\)" if tuned else r"\(1\), 2"):
        _accepting(0 if tuned else 1).load_state(*strat.state())


def test_with_acceptance_a_client_that_lost_its_copy_is_resynced():
    strat, app = _accepting(), _app(SlopeBox())
    state = _sim(strat, app, 4)
    app.deep_cache.pop("c1")
    app.deep_probe.pop("c1")
    state = _sim(strat, app, 7, state)
    assert "c1" in {d["id"] for d in state.history[4]["dropped"]}
    assert not state.history[5]["dropped"] and not state.history[6]["dropped"]
    # every client's copy is the server's accepted prompt again (the digest check passed in rounds 6-7)
    assert state.history[6]["aggregate"]["rows"] == sum(len(s) for s in SHARDS.values())
    b6 = {c["id"]: c["bytes_down"] for c in state.history[5]["clients"]}
    assert b6["c1"] > b6["c0"]  # c1 got the accepted rows again, c0 only what changed

"""The black box on tiny random models (a causal Llama and a masked RoBERTa), the projection,
task files and few-shot splits, and the client's local CMA-ES."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedtune import config as C
from fedtune.core.strategy import FitIns
from fedtune.errors import ConfigError, DataError
from fedtune.core.batching import plan_forwards
from fedtune.fedbpt.encoded import concat
from fedtune.fedbpt.loading import load_blackbox
from fedtune.fedbpt.client import FedBPTClientApp, LocalSettings, Shard
from fedtune.fedbpt.prompt import Projection, ProjectionSpec, load_prompt, save_prompt
from fedtune.fedbpt.tasks import BUILTIN, Example, check_spec, few_shot, load_examples, render

# the tiny tokenizer has few merges: " is" and " the" are single tokens, " bad" is not
SPEC = replace(BUILTIN["sst2"], verbalizer={"0": "is", "1": "the"})
TEXTS = [("the movie was great",), ("a dull film, long and slow",), ("It was fine",)]


def _box(path, mode="add", n=3, init=""):
    cfg = C.load(None, [f"model.name={str(path)!r}", "model.autocast='off'"])
    fb = replace(cfg.fedbpt, model_kind="auto", n_prompt_tokens=n, prompt_mode=mode, init_prompt=init, max_seq_len=64,
                 max_forward_rows=7, forward_overhead_tokens=256)  # 7: a population's rows are split over several forwards
    return load_blackbox(cfg.model, fb)


@pytest.fixture(scope="module")
def llama_box(tiny_llama):
    return _box(tiny_llama)


@pytest.fixture(scope="module")
def roberta_box(tiny_roberta):
    return _box(tiny_roberta)


# ----------------------------------------------------------------------------- the boundary


def test_causal_logits_are_the_next_token_after_the_template(llama_box, tiny_llama):
    """Zero prompt in add mode = the plain model on the same ids: logits of the verbalizer words
    at the last context token."""
    from transformers import AutoModelForCausalLM

    box = llama_box
    assert box.kind == "causal"
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(SPEC, TEXTS)
    got = box.logits(None, enc, ids)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for i in range(len(TEXTS)):
        n_tok = int(enc.attention_mask[i].sum())
        assert enc.answer_pos[i] == n_tok - 1
        with torch.no_grad():
            ref = model(torch.tensor(enc.input_ids[i:i + 1, :n_tok])).logits[0, -1, ids].numpy()
        np.testing.assert_allclose(got[i], ref, atol=1e-4)


def test_masked_logits_are_read_at_the_mask(roberta_box, tiny_roberta):
    from transformers import AutoModelForMaskedLM

    box = roberta_box
    assert box.kind == "masked"
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(SPEC, TEXTS)
    got = box.logits(None, enc, ids)[0]
    model = AutoModelForMaskedLM.from_pretrained(tiny_roberta).eval()
    with torch.no_grad():
        full = model(torch.tensor(enc.input_ids), attention_mask=torch.tensor(enc.attention_mask)).logits
    for i in range(len(TEXTS)):
        assert enc.input_ids[i, enc.answer_pos[i]] == box.tokenizer.mask_token_id
        np.testing.assert_allclose(got[i], full[i, enc.answer_pos[i], ids].numpy(), atol=1e-4)


@pytest.mark.parametrize("which", ["llama_box", "roberta_box"])
def test_population_in_one_pass_equals_one_at_a_time(which, request):
    box = request.getfixturevalue(which)
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(SPEC, TEXTS)
    prompts = np.random.default_rng(0).standard_normal((4, 3, box.hidden_size)).astype(np.float32) * 0.5
    calls = box.forward_calls
    batched = box.logits(prompts, enc, ids)  # 12 rows, max_forward_rows = 7: two forwards
    assert box.forward_calls - calls == 2 and batched.shape == (4, 3, 2)
    single = np.concatenate([box.logits(p[None], enc, ids) for p in prompts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # the prompt reaches the answer
    assert not any(p.requires_grad for p in box._model.parameters())


@pytest.mark.parametrize("overhead", [0, 8, 10_000])
@pytest.mark.parametrize("max_rows", [1, 4, 512])
def test_forward_plan_covers_every_row_once(overhead, max_rows):
    lengths = np.array([9, 3, 9, 5, 12, 3, 7])
    p_count, b_count = 4, len(lengths)
    plan = plan_forwards(lengths, p_count, max_rows, overhead)
    rows = np.concatenate([r for r, _ in plan])
    assert sorted(rows.tolist()) == list(range(p_count * b_count))  # every (candidate, row) exactly once
    for r, width in plan:
        assert 0 < len(r) <= max_rows and width >= lengths[r % b_count].max()  # no row is cut
    padded = sum(len(r) * w for r, w in plan)
    if overhead == 0:  # nothing to amortize: no padding at all
        assert padded == p_count * lengths.sum()
    if overhead == 10_000 and max_rows == 512:  # overhead dominates: one forward, padded to the longest row
        assert len(plan) == 1 and plan[0][1] == 12


def test_length_grouped_forwards_give_the_same_logits(llama_box):
    ids = llama_box.label_token_ids(SPEC.words, True)
    enc = llama_box.encode_texts(SPEC, TEXTS)  # rows of different lengths
    prompts = np.random.default_rng(1).standard_normal((3, 3, llama_box.hidden_size)).astype(np.float32) * 0.5
    one = llama_box.logits(prompts, enc, ids)
    llama_box.forward_overhead_tokens, calls, padded = 0, llama_box.forward_calls, llama_box.padded_tokens_forwarded
    try:
        grouped = llama_box.logits(prompts, enc, ids)
    finally:
        llama_box.forward_overhead_tokens = 256
    widths = enc.attention_mask.sum(1)
    assert llama_box.forward_calls - calls >= len(set(widths.tolist()))  # one group per width
    assert llama_box.padded_tokens_forwarded - padded == 3 * widths.sum()  # no padding
    np.testing.assert_allclose(grouped, one, atol=1e-5)


# text before <P>: the population can share it (the prompt sits between the text and the answer)
TEXT_FIRST = replace(SPEC, template="{sentence} . <P> . It was <mask> .")
TEXTS5 = TEXTS + [("ok",), ("the end of a long and winding road, and then some more",)]


@pytest.mark.parametrize("mode", ["add", "cat"])
@pytest.mark.parametrize("max_rows", [7, 512])
def test_shared_context_gives_the_same_logits(tiny_llama, mode, max_rows):
    """Causal LM, text before <P>: the text runs once per example and every candidate attends
    to its cached keys/values. Same logits as whole-context forwards, rows of different text
    lengths, prefix and candidate forwards split over several chunks (max_rows = 7)."""
    box = _box(tiny_llama, mode=mode)
    box.max_forward_rows = max_rows
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(TEXT_FIRST, TEXTS5)
    assert len(set(enc.slot_start.tolist())) > 1  # the shared parts differ in length
    prompts = np.random.default_rng(2).standard_normal((4, 3, box.hidden_size)).astype(np.float32) * 0.5
    shared_calls, calls, tokens = box.shared_context_calls, box.forward_calls, box.tokens_forwarded
    shared = box.logits(prompts, enc, ids)
    assert box.shared_context_calls == shared_calls + 1
    p, b = prompts.shape[0], len(enc)
    # the text before <P> ran once per example, not once per candidate
    assert box.tokens_forwarded - tokens == enc.tokens * p - (p - 1) * int(enc.slot_start.sum())
    box.share_context = False
    full = box.logits(prompts, enc, ids)
    assert box.shared_context_calls == shared_calls + 1
    np.testing.assert_allclose(shared, full, atol=1e-5)
    assert not np.allclose(shared[0], shared[1])  # the prompt still reaches the answer
    one = box.logits(prompts[:1], enc, ids)  # one candidate: nothing to share
    np.testing.assert_allclose(one[0], full[0], atol=1e-5)


def test_shared_context_respects_the_cache_budget(tiny_llama, monkeypatch):
    """A tiny budget for gathered key/value caches: one candidate row per forward, same logits."""
    import fedtune.fedbpt.blackbox as B

    box = _box(tiny_llama)
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(TEXT_FIRST, TEXTS5)
    prompts = np.random.default_rng(3).standard_normal((4, 3, box.hidden_size)).astype(np.float32)
    want = box.logits(prompts, enc, ids)
    monkeypatch.setattr(B, "SHARED_CACHE_BYTES", 1)
    calls, shared = box.forward_calls, box.shared_context_calls
    got = box.logits(prompts, enc, ids)
    assert box.shared_context_calls == shared + 1
    assert box.forward_calls - calls >= 4 * len(enc)  # every candidate row alone, plus the shared passes
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sliding", [False, True])
def test_sliding_window_models_do_not_share(tmp_path, sliding):
    """A Qwen2 (another causal family): full attention shares and matches whole-context
    forwards; with sliding-window layers (whose cache drops early tokens) it never shares."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer(tmp_path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, use_sliding_window=sliding, sliding_window=4, max_window_layers=0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    box = _box(tmp_path)
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(TEXT_FIRST, TEXTS5)
    prompts = np.random.default_rng(4).standard_normal((4, 3, box.hidden_size)).astype(np.float32)
    got = box.logits(prompts, enc, ids)
    assert box.shared_context_calls == (0 if sliding else 1)
    box.share_context = False
    np.testing.assert_allclose(got, box.logits(prompts, enc, ids), atol=1e-5)


def test_masked_lm_never_shares_context(tiny_roberta):
    """In a masked LM the text attends to the prompt: no sharing, whatever the setting."""
    box = _box(tiny_roberta)
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(TEXT_FIRST, TEXTS)
    box.logits(np.zeros((3, 3, box.hidden_size), dtype=np.float32), enc, ids)
    assert box.shared_context_calls == 0


def test_cat_mode_equals_prepending_embeddings(tiny_llama):
    """cat: A z sits in the prompt slots; the same as building inputs_embeds by concatenation
    (text before <P>, the prompt, the rest) with the attention mask extended."""
    from transformers import AutoModelForCausalLM

    box = _box(tiny_llama, mode="cat")
    ids = box.label_token_ids(SPEC.words, True)
    enc = box.encode_texts(SPEC, TEXTS[:1])
    prompt = np.random.default_rng(1).standard_normal((1, 3, box.hidden_size)).astype(np.float32)
    got = box.logits(prompt, enc, ids)[0, 0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    n_tok, s = int(enc.attention_mask[0].sum()), int(enc.slot_start[0])
    text_ids = np.concatenate([enc.input_ids[0, :s], enc.input_ids[0, s + 3:n_tok]])
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor(text_ids))
        x = torch.cat([emb[:s], torch.tensor(prompt[0]), emb[s:]])[None]
        ref = model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long)).logits[0, -1, ids]
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
    # with an initial prompt p0, the zero z already differs from the zero-embedding prompt
    box_p0 = _box(tiny_llama, mode="cat", init="the movie")
    assert not np.allclose(box_p0.logits(None, enc, ids), box.logits(None, enc, ids))


def test_verbalizer_word_of_several_tokens_is_named(llama_box):
    with pytest.raises(ConfigError, match=r"word 'bad' is not one token .* ' bad' tokenizes to 2 tokens"):
        llama_box.label_token_ids(["is", "bad"], True)


def test_perturb_replaces_only_text_tokens(llama_box):
    enc = llama_box.encode_texts(SPEC, TEXTS)
    same = llama_box.perturb(enc, 0.0, seed=1)
    assert np.array_equal(same.input_ids, enc.input_ids)
    p = llama_box.perturb(enc, 1.0, seed=1)
    fixed = ~enc.free
    assert np.array_equal(p.input_ids[fixed], enc.input_ids[fixed])  # slots, specials, padding stay
    assert (p.input_ids[enc.free] != enc.input_ids[enc.free]).mean() > 0.8
    both = concat(enc, p, llama_box.pad_id)
    assert len(both) == 2 * len(enc)


def test_perturbed_copies_never_draw_special_tokens(llama_box):
    """<mask>, EOS, padding and the chat markers are special; a replaced token is never one
    (the tiny tokenizer's vocabulary is small, so 200 full replacements would hit them often)."""
    specials = set(llama_box.tokenizer.all_special_ids)
    assert len(specials) >= 3
    enc = llama_box.encode_texts(SPEC, TEXTS)
    for seed in range(200):
        p = llama_box.perturb(enc, 1.0, seed=seed)
        assert not set(p.input_ids[enc.free].tolist()) & specials, seed


def test_long_text_is_cut_to_max_seq_len(llama_box):
    enc = llama_box.encode_texts(SPEC, [("word " * 200,)])
    assert enc.attention_mask.sum() <= llama_box.max_seq_len
    assert enc.input_ids[0, enc.answer_pos[0]] != llama_box.pad_id


# ----------------------------------------------------------------------------- projection


def test_projection_std_rule_and_rebuild(tmp_path):
    spec = ProjectionSpec(seed=5, intrinsic_dim=200, n_prompt_tokens=4, hidden_size=50, embedding_std=0.3)
    a, b = Projection(spec), Projection(spec)
    assert np.array_equal(a.A, b.A)  # every party rebuilds the same A from the seed
    assert not np.array_equal(a.A, Projection(replace(spec, seed=6)).A)
    assert spec.std == pytest.approx(0.3 / np.sqrt(200))
    assert a.A.std() == pytest.approx(spec.std, rel=0.02)
    # z ~ N(0, I): entries of A z have the word-embedding scale
    z = np.random.default_rng(0).standard_normal((64, 200))
    assert a(z).std() == pytest.approx(0.3, rel=0.05)
    assert a(z).shape == (64, 4, 50)
    save_prompt(tmp_path / "p", z[0], a, {"model": "m"})
    z2, emb, meta = load_prompt(tmp_path / "p")
    np.testing.assert_allclose(emb, a(z[0])[0], rtol=1e-6)
    assert meta["projection"]["seed"] == 5 and meta["projection"]["std"] == pytest.approx(spec.std)


# ----------------------------------------------------------------------------- tasks


def test_task_files_and_few_shot(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"text {i} \t{i % 2}\n" for i in range(40)))
    csv_ = tmp_path / "t.csv"
    csv_.write_text("sentence,label\n" + "".join(f"\"text, {i}\",{i % 2}\n" for i in range(10)))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(f'{{"sentence": "text {i}", "label": {i % 2}}}\n' for i in range(10)))
    rows = load_examples(SPEC, str(tsv))
    assert len(rows) == 40 and rows[0].texts == ("text 0",) and rows[1].label == 1  # trailing space stripped
    assert load_examples(SPEC, str(csv_))[3].texts == ("text, 3",)
    assert len(load_examples(SPEC, str(jsonl))) == 10
    fs = few_shot(rows, SPEC, k_shot=5, dev_shots=3, seed=0)
    assert len(fs.train) == 10 and len(fs.dev) == 6
    assert {r.source for r in fs.train}.isdisjoint({r.source for r in fs.dev})
    assert [sum(r.label == c for r in fs.train) for c in (0, 1)] == [5, 5]
    assert few_shot(rows, SPEC, 5, 3, seed=0).train == fs.train  # seeded
    with pytest.raises(DataError, match=r"class '0' \(is\) has 20 rows; task.k_shot = 18 plus task.dev_shots = 3 need 21"):
        few_shot(rows, SPEC, k_shot=18, dev_shots=3, seed=0)


def test_label_outside_the_verbalizer_names_the_line(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\na\t0\nb\t2\n")
    with pytest.raises(DataError, match=r"t.tsv:3: label '2' is not in task.verbalizer"):
        load_examples(SPEC, str(tsv))


def test_builtin_tasks_are_consistent():
    for spec in BUILTIN.values():
        check_spec(spec)
        r = render(spec, ["x"] * len(spec.text_columns))
        assert r.before_prompt == "" and "x" in (r.before_answer + r.after_answer)
    with pytest.raises(ConfigError, match="no text placeholder"):
        check_spec(replace(SPEC, template="<P> It was <mask> ."))
    with pytest.raises(ConfigError, match="answer slot"):
        check_spec(replace(SPEC, template="{sentence} It was"))


# ----------------------------------------------------------------------------- the client


def _client(box, batch=True, perturb=True, d=16):
    proj = Projection(ProjectionSpec(3, d, box.n_prompt_tokens, box.hidden_size, box.embedding_std))
    rows = [Example(t, i % 2) for i, t in enumerate(TEXTS * 2)]
    shard = Shard(box.encode_texts(SPEC, [r.texts for r in rows]), np.array([r.label for r in rows]))
    s = LocalSettings(popsize=4, local_iter=3, perturb=perturb, batch_population=batch)
    return FedBPTClientApp(box, proj, {"client_000": shard}, box.label_token_ids(SPEC.words, True), s, seed=1)


def test_client_fit_one_forward_per_generation(llama_box):
    d = 16
    ins = FitIns({"mean": np.zeros(d, np.float32), "sigma": np.array([1.0], np.float32)}, {"round": 1, "es_seed": 9})
    llama_box.max_forward_rows, llama_box.forward_overhead_tokens = 512, 10**6  # never split by length
    try:
        a = _client(llama_box, batch=True).fit("client_000", ins)
        b = _client(llama_box, batch=False).fit("client_000", ins)
    finally:
        llama_box.max_forward_rows, llama_box.forward_overhead_tokens = 7, 256
    assert sorted(a.arrays) == ["fitness", "mean", "sigmas"] and a.arrays["mean"].dtype == np.float32
    assert a.num_examples == 6 and len(a.arrays["sigmas"]) == a.metrics["generations"] == 3
    assert a.metrics["forward_calls"] == 3 + 1  # one per generation (clean + perturbed rows together), + the final mean
    assert b.metrics["forward_calls"] == 3 * 4 + 1
    # the same ES seed and the same fitness values: the same local search
    np.testing.assert_allclose(a.arrays["mean"], b.arrays["mean"], atol=1e-4)
    assert np.isfinite(a.arrays["fitness"]).all() and np.linalg.norm(a.arrays["mean"]) > 0


def test_client_starts_from_the_global_covariance(llama_box):
    from fedtune.fedbpt.client import make_local_es

    d = 6
    cov = np.diag([4.0, 1, 1, 1, 1, 0.25])
    es = make_local_es(np.zeros(d), 1.0, 3, LocalSettings(popsize=200, local_iter=1), cov)
    x = np.array(es.ask())
    np.testing.assert_allclose(x.std(0)[[0, 5]], [2.0, 0.5], rtol=0.2)


def test_prepare_task_label_skew_split(tmp_path):
    """Dirichlet label skew across clients from the few-shot training rows (no model needed)."""
    from fedtune.fedbpt.session import prepare_task

    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(200)))
    cfg = C.load(None, ["run.algorithm='fedbpt'", f"task.train_path={str(tsv)!r}", f"task.test_path={str(tsv)!r}",
                        "task.k_shot=40", "task.dev_shots=5", "task.test_max_rows=20", "partition.num_clients=4",
                        "partition.method='dirichlet'", "partition.alpha=0.3", "partition.min_client_size=5"])
    data = prepare_task(cfg)
    assert len(data.train) == 80 and len(data.dev) == 10 and len(data.test) == 20
    parts = data.client_rows()
    assert sum(len(v) for v in parts.values()) == 80 and min(len(v) for v in parts.values()) >= 5
    mix = [np.mean([e.label for e in rows]) for rows in parts.values()]
    assert max(mix) - min(mix) > 0.3  # skewed label mixes


def test_training_rows_that_repeat_a_test_row_are_removed(tmp_path):
    from fedtune.fedbpt.session import prepare_task

    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(40))
                     + "A  Great, great FILM!\t1\n")
    test = tmp_path / "test.tsv"
    test.write_text("sentence\tlabel\na great great film\t1\nunseen one\t0\n")
    cfg = C.load(None, ["run.algorithm='fedbpt'", f"task.train_path={str(train)!r}", f"task.test_path={str(test)!r}",
                        "task.k_shot=0", "task.dev_shots=2", "partition.num_clients=2", "partition.method='iid'"])
    data = prepare_task(cfg)
    assert data.overlap_removed == 1
    assert all("great" not in e.texts[0].lower() for e in data.train + data.dev)
    assert len(data.train) + len(data.dev) == 40

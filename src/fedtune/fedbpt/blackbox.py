"""The black-box model boundary: the only thing FedBPT client code may call.

A `BlackBoxLM` takes text in (it owns tokenization, as an inference API does) and, for a
population of prompt embeddings, returns the logits of the verbalizer words at the answer
slot. Nothing else crosses: no gradients (every call runs under `torch.inference_mode`),
no parameters, no hidden states. Besides `encode`, `perturb` and `logits`, it publishes a
few facts an API would publish: hidden size, vocabulary size and the standard deviation of
its word-embedding matrix (which sets the scale of the random projection).

Two kinds of model sit behind it:
- masked LMs (RoBERTa, BERT): the answer slot is the `<mask>` token; logits are read there.
- causal LMs (Llama family, SmolLM2): the template is cut at the answer slot and the label
  word is the next token after it; logits are read at the last token of the context.

The prompt occupies `n_prompt_tokens` slots at the template's `<P>` (after the model's
leading special token, if any). In `add` mode the slots hold placeholder tokens and the
prompt is added to their embeddings (BBT's default); in `cat` mode the slots hold the
prompt itself, plus an optional initial prompt p0 (the embeddings of a text), which is the
same as prepending it to the input embeddings with the attention mask extended.
"""

from __future__ import annotations

import numpy as np

from fedtune.core.batching import plan_forwards
from fedtune.errors import ConfigError, ModelError
from fedtune.fedbpt.encoded import Encoded
from fedtune.fedbpt.model_parts import placeholder_ids, special_affixes, use_cpu_gqa_attention
from fedtune.fedbpt.tasks import Rendered

SHARED_CACHE_BYTES = 256 * 2**20  # at most this much gathered key/value cache per shared-context forward


class BlackBoxLM:
    """Forward-only access to a frozen language model for prompt tuning."""

    def __init__(self, model, tokenizer, kind: str, device, amp_dtype, *, n_prompt_tokens: int, prompt_mode: str,
                 init_prompt: str = "", max_seq_len: int = 256, max_forward_rows: int = 512, forward_overhead_tokens: int = 128, share_context: bool = True,
                 name: str = ""):
        import torch

        if kind not in ("causal", "masked"):
            raise ValueError(f"unknown model kind {kind!r}")
        if prompt_mode not in ("add", "cat"):
            raise ValueError(f"unknown prompt mode {prompt_mode!r}")
        self._model = model.eval().requires_grad_(False)
        if kind == "causal" and torch.device(device).type == "cpu":
            use_cpu_gqa_attention(model)
        self._device = device
        self._amp_dtype = amp_dtype
        self.tokenizer = tokenizer  # text in: tokenization is part of the service
        self.kind = kind
        self.name = name
        self.n_prompt_tokens = n_prompt_tokens
        self.prompt_mode = prompt_mode
        self.init_prompt = init_prompt
        self.max_seq_len = max_seq_len
        self.max_forward_rows = max(1, max_forward_rows)
        emb = model.get_input_embeddings().weight
        self.vocab_size = int(emb.shape[0])
        self.hidden_size = int(emb.shape[1])
        with torch.no_grad():
            self.embedding_std = float(emb.detach().float().std())  # BBT's std_hat
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prefix, self._suffix = special_affixes(tokenizer)
        if kind == "causal":
            self._suffix = []  # the label word is the next token: nothing may follow the context
            head = model.get_output_embeddings()
            if head is None:
                raise ModelError(f"model '{name}' has no output embeddings to read next-token logits from")
            self._head = head
        else:
            if tokenizer.mask_token_id is None:
                raise ModelError(f"model '{name}' is a masked LM but its tokenizer has no mask token")
            self._head = getattr(model, "lm_head", None) or getattr(model, "cls", None)
            if self._head is None:
                raise ModelError(f"masked LM '{name}': no 'lm_head' or 'cls' module to read the mask logits from")
        specials = set(tokenizer.all_special_ids)
        self._ordinary_ids = np.array([i for i in range(len(tokenizer)) if i not in specials], dtype=np.int64)
        self.placeholder_ids = placeholder_ids(len(tokenizer), n_prompt_tokens, specials)
        with torch.inference_mode():
            table = model.get_input_embeddings()
            if prompt_mode == "add":
                base = table(torch.tensor(self.placeholder_ids, device=device))
            elif init_prompt:
                ids = tokenizer(init_prompt, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ConfigError(f"fedbpt.init_prompt = {init_prompt!r} has no tokens")
                ids = (ids * (n_prompt_tokens // len(ids) + 1))[:n_prompt_tokens]
                base = table(torch.tensor(ids, device=device))
            else:
                base = torch.zeros(n_prompt_tokens, self.hidden_size, device=device, dtype=emb.dtype)
        self._slot_base = base.float().clone()  # (n, H): what the prompt is added to
        self.forward_calls = 0  # forward passes run (for benchmarks and tests)
        self.rows_forwarded = 0
        self.tokens_forwarded = 0  # non-padding tokens, prompt slots included
        self.padded_tokens_forwarded = 0  # rows x width of every forward
        self.forward_overhead_tokens = forward_overhead_tokens
        self.share_context = share_context
        # a causal LM whose every layer attends to the whole context (a sliding-window layer's
        # cache would drop early tokens; hybrid or recurrent models have no key/value cache)
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        self._can_share = kind == "causal" and all(t == "full_attention" for t in layer_types)
        self.shared_context_calls = 0
        self._hooks = self._deep_now = None  # deep prompts: installed on first use  # logits calls that ran the text before <P> once for all candidates

    # ------------------------------------------------------------------ facts an API would publish

    def info(self) -> dict:
        return {"model": self.name, "kind": self.kind, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "embedding_std": self.embedding_std, "n_prompt_tokens": self.n_prompt_tokens,
                "prompt_mode": self.prompt_mode, "init_prompt": self.init_prompt}

    # ------------------------------------------------------------------ text in

    def label_token_ids(self, words: list[str], space_before: list[bool] | bool = True,
                        where: str = "task.verbalizer") -> list[int]:
        """The single token of each verbalizer word, as it follows the context; an error names
        a word that is not one token and what it tokenizes to."""
        if isinstance(space_before, bool):
            space_before = [space_before] * len(words)
        out = []
        for w, sp in zip(words, space_before):
            text = (" " + w) if sp else w
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                raise ConfigError(f"{where}: word {w!r} is not one token for model '{self.name}': {text!r} tokenizes "
                                  f"to {len(ids)} tokens {pieces}; pick a word that is a single token")
            out.append(int(ids[0]))
        if len(set(out)) != len(out):
            raise ConfigError(f"{where}: two words map to the same token for model '{self.name}': {words}")
        return out

    def encode(self, rows: list[Rendered]) -> Encoded:
        """Token ids for rendered rows: [specials] text [prompt slots] text [<mask> text] [specials].
        The space before the answer slot belongs to the label word, so it is cut here."""
        tok = self.tokenizer
        n = self.n_prompt_tokens
        seqs, slots, answers, frees = [], [], [], []
        for r in rows:
            a = tok(r.before_prompt, add_special_tokens=False)["input_ids"] if r.before_prompt else []
            b_text = r.before_answer.rstrip()
            b = tok(b_text, add_special_tokens=False)["input_ids"] if b_text else []
            ids = list(self._prefix) + a
            free = [False] * len(self._prefix) + [True] * len(a)
            slot = len(ids)
            ids += self.placeholder_ids if self.prompt_mode == "add" else [self.pad_id] * n
            free += [False] * n
            ids += b
            free += [True] * len(b)
            if self.kind == "causal":
                answer = len(ids) - 1  # the next token after the whole context is the label word
            else:
                answer = len(ids)
                c = tok(r.after_answer, add_special_tokens=False)["input_ids"] if r.after_answer.strip() else []
                ids += [tok.mask_token_id] + c
                free += [False] + [True] * len(c)
            ids += self._suffix
            free += [False] * len(self._suffix)
            if len(ids) > self.max_seq_len:
                raise _TooLong(len(ids))
            seqs.append(ids)
            slots.append(slot)
            answers.append(answer)
            frees.append(free)
        t = max(len(s) for s in seqs)
        input_ids = np.full((len(seqs), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), t), dtype=np.int64)
        free_m = np.zeros((len(seqs), t), dtype=bool)
        for i, (s, f) in enumerate(zip(seqs, frees)):
            input_ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
            free_m[i, :len(s)] = f
        return Encoded(input_ids, mask, np.array(slots, dtype=np.int64), np.array(answers, dtype=np.int64), free_m)

    def encode_texts(self, spec, texts_list: list, truncate: bool = True) -> Encoded:
        """Render and encode rows of text fields, cutting the longest field until a row fits
        in max_seq_len tokens."""
        from fedtune.fedbpt.tasks import render

        rows = []
        for texts in texts_list:
            texts = list(texts)
            while True:
                try:
                    self.encode([render(spec, texts)])
                    break
                except _TooLong as e:
                    if not truncate:
                        raise ConfigError(f"a row is {e.n} tokens, over fedbpt.max_seq_len = {self.max_seq_len}") from None
                    lens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
                    j = int(np.argmax(lens))
                    keep = lens[j] - (e.n - self.max_seq_len)
                    if keep < 1:
                        raise ConfigError(f"fedbpt.max_seq_len = {self.max_seq_len} leaves no room for the text "
                                          f"(template and {self.n_prompt_tokens} prompt tokens take the rest)") from None
                    ids = self.tokenizer(texts[j], add_special_tokens=False)["input_ids"][:keep]
                    texts[j] = self.tokenizer.decode(ids)
            rows.append(render(spec, texts))
        return self.encode(rows)

    def perturb(self, enc: Encoded, rate: float, seed: int) -> Encoded:
        """A copy with each text token replaced, with probability `rate`, by a random vocabulary
        id (FedBPT's perturbed copy), never a special token (<mask>, EOS, padding...). Prompt slots,
        the answer slot and special tokens stay."""
        rng = np.random.default_rng(seed)
        replace = enc.free & (rng.random(enc.input_ids.shape) < rate)
        random_ids = self._ordinary_ids[rng.integers(0, len(self._ordinary_ids), size=enc.input_ids.shape)]
        return Encoded(np.where(replace, random_ids, enc.input_ids), enc.attention_mask.copy(), enc.slot_start.copy(),
                       enc.answer_pos.copy(), enc.free.copy())

    # ------------------------------------------------------------------ the forward pass

    def logits(self, prompts: np.ndarray | None, enc: Encoded, label_ids: list[int],
               deep: np.ndarray | None = None) -> np.ndarray:
        """Verbalizer logits, shape (P, B, C), for P prompts (P, n_prompt_tokens, hidden) on B rows.

        All P x B rows go through the model together: evaluating a whole CMA-ES population
        costs a few batched passes, not P. The forward rows are ordered by length and cut into
        forwards by `plan_forwards` (each forward padded only to its own longest row, at most
        max_forward_rows rows): a row appears once per candidate with the same length, so a
        population packs into forwards with almost no padding. `prompts` None means the zero
        prompt (the untuned model with its placeholder slots). `deep` (P, L-1, n, hidden): deep
        prompts' offsets, added at the prompt positions to the hidden states entering layers 1..L-1.
        """
        import torch

        n, h = self.n_prompt_tokens, self.hidden_size
        if prompts is None:
            prompts = np.zeros((1, n, h), dtype=np.float32)
        prompts = np.asarray(prompts, dtype=np.float32)
        if prompts.ndim != 3 or prompts.shape[1:] != (n, h):
            raise ValueError(f"prompts must have shape (P, {n}, {h}), got {prompts.shape}")
        p_count, b_count = prompts.shape[0], len(enc)
        dev = self._device
        out = np.empty((p_count * b_count, len(label_ids)), dtype=np.float32)
        lengths = enc.attention_mask.sum(1).astype(np.int64)  # right-padded: a row's width
        with torch.inference_mode():
            ids = torch.as_tensor(enc.input_ids, device=dev)
            mask = torch.as_tensor(enc.attention_mask, device=dev)
            slot_idx = torch.as_tensor(enc.slot_start, device=dev)[:, None] + torch.arange(n, device=dev)  # (B, n)
            answer = torch.as_tensor(enc.answer_pos, device=dev)
            tok_emb = self._model.get_input_embeddings()(ids).float()  # (B, T, H)
            slots = self._slot_base.to(dev)[None] + torch.as_tensor(prompts, device=dev)  # (P, n, H)
            label = torch.as_tensor(label_ids, device=dev)
            self._deep_now = None if deep is None else torch.as_tensor(self._check_deep(deep, p_count), device=dev)
            if self._deep_now is not None:  # the layers whose offsets are all zero in this call are skipped
                self._hooks.live = self._deep_now.flatten(2).any(dim=2).any(dim=0).tolist()
            try:
                if self._sharing_pays(enc, p_count):
                    self._forward_shared(tok_emb, slots, enc, lengths, answer, label, out)
                else:
                    self._forward_full(tok_emb, slots, mask, lengths, slot_idx, answer, label, out, b_count)
            finally:
                self._deep_now = None
                if self._hooks is not None:
                    self._hooks.now = None
        return out.reshape(p_count, b_count, len(label_ids))

    def _check_deep(self, deep, p_count: int) -> np.ndarray:
        from fedtune.fedbpt.deep import DeepHooks

        deep = np.asarray(deep, dtype=np.float32)
        if self._hooks is None:
            self._hooks = DeepHooks(self._model)
        want = (p_count, len(self._hooks.layers) - 1, self.n_prompt_tokens, self.hidden_size)
        if deep.shape != want:
            raise ValueError(f"deep prompt offsets must have shape {want}, got {deep.shape}")
        return deep

    def layer_stds(self) -> list[float]:
        """The std of the hidden states entering each layer 1..L-1 (published, like embedding_std)."""
        from fedtune.fedbpt.deep import layer_input_stds

        return layer_input_stds(self._model, self.tokenizer, self._device, self._autocast)

    def _set_deep(self, p, pos) -> None:  # this forward's rows (candidates p), prompt positions pos (rows, n)
        if self._deep_now is not None:
            self._hooks.now = (self._deep_now[p], pos)

    def _forward_full(self, tok_emb, slots, mask, lengths, slot_idx, answer, label, out, b_count):
        """Every forward row holds a whole context: [text before <P>] prompt [rest]."""
        import torch

        dev = self._device
        for rows_np, width in plan_forwards(lengths, slots.shape[0], self.max_forward_rows, self.forward_overhead_tokens):
            r = torch.as_tensor(rows_np, device=dev)
            p, b = r // b_count, r % b_count  # (rows,) candidate and row of each forward row
            x = tok_emb[b, :width].clone()  # (rows, width, H)
            x[torch.arange(len(r), device=dev)[:, None], slot_idx[b]] = slots[p]
            m = mask[b, :width]
            self._set_deep(p, slot_idx[b])
            full = bool((lengths[rows_np % b_count] == width).all())  # no padding in this forward
            with self._autocast():
                x = self._input_dtype(x)
                hidden = self._body(x, None if full else m)  # (rows, width, H); no mask: the fast causal path
                last = hidden[torch.arange(len(r), device=dev), answer[b]]  # (rows, H)
                logits = self._verbalize(last, label)
            out[rows_np] = logits.float().cpu().numpy()
            self._count(len(r), int(m.sum()), len(r) * width)

    def _sharing_pays(self, enc: Encoded, p_count: int) -> bool:
        """Share the text before <P> across candidates (causal LMs only: a masked LM's text
        attends to the prompt) when the tokens saved outweigh the extra forwards."""
        if not self._can_share or not self.share_context or p_count < 2 or enc.slot_start.min() < 1:
            return False
        saved = (p_count - 1) * int(enc.slot_start.sum())
        extra = -(-len(enc) // self.max_forward_rows) * self.forward_overhead_tokens
        return saved > extra

    def _forward_shared(self, tok_emb, slots, enc: Encoded, lengths, answer, label, out):
        """Prefix sharing. In a causal LM the text before the prompt slot does not see the
        prompt, so its keys and values are the same for every candidate: one pass over each
        example's text before <P> builds them, and each candidate's forward runs only the
        prompt and what follows, attending to that cache. Same logits as `_forward_full` up
        to float rounding; the population's work drops by (P - 1) x the shared tokens."""
        import torch
        from transformers import DynamicCache

        dev, cfg = self._device, self._model.config
        b_count, n = len(enc), self.n_prompt_tokens
        pre = enc.slot_start.astype(np.int64)  # tokens before the prompt slot, per example
        rest = lengths - pre  # prompt slots + the rest of the context
        pre_t, rest_t = torch.as_tensor(pre, device=dev), torch.as_tensor(rest, device=dev)
        t_pre, t_all = int(pre.max()), tok_emb.shape[1]
        keys = values = None  # per layer: (B, kv heads, t_pre, head dim), each example's text before <P>
        for rows_np, width in plan_forwards(pre, 1, self.max_forward_rows, self.forward_overhead_tokens):
            r = torch.as_tensor(rows_np, device=dev)
            cache = DynamicCache(config=cfg)
            with self._autocast():  # right-padded and causal: no mask, as pads sit after every real token
                self._model.base_model(inputs_embeds=self._input_dtype(tok_emb[r, :width]), past_key_values=cache,
                                       use_cache=True)
            if keys is None:
                keys = [layer.keys.new_zeros(b_count, layer.keys.shape[1], t_pre, layer.keys.shape[3]) for layer in cache.layers]
                values = [k.clone() for k in keys]
            for i, layer in enumerate(cache.layers):
                keys[i][r, :, :width] = layer.keys
                values[i][r, :, :width] = layer.values
            self._count(len(r), int(pre[rows_np].sum()), len(r) * width)
        self.shared_context_calls += 1
        # each candidate forward gathers its rows' caches: keep that copy under SHARED_CACHE_BYTES
        per_row = sum(k.element_size() * k[0].numel() * 2 for k in keys)
        max_rows = max(1, min(self.max_forward_rows, SHARED_CACHE_BYTES // max(per_row, 1)))
        for rows_np, width in plan_forwards(rest, slots.shape[0], max_rows, self.forward_overhead_tokens):
            r = torch.as_tensor(rows_np, device=dev)
            p, b = r // b_count, r % b_count
            start = pre_t[b]  # (rows,) where each row's part begins
            pos = start[:, None] + torch.arange(width, device=dev)  # (rows, width) absolute positions
            x = tok_emb[b[:, None], pos.clamp(max=t_all - 1)]  # (rows, width, H)
            x[:, :n] = slots[p]  # the part begins with the prompt slots
            k_len = int(pre[rows_np % b_count].max())
            cache = DynamicCache(config=cfg)
            for i in range(len(keys)):
                cache.update(keys[i][b, :, :k_len], values[i][b, :, :k_len], i)
            self._set_deep(p, torch.arange(n, device=dev)[None].expand(len(r), n))
            m = torch.cat([torch.arange(k_len, device=dev) < start[:, None],
                           torch.arange(width, device=dev) < rest_t[b][:, None]], 1).long()
            with self._autocast():
                hidden = self._model.base_model(inputs_embeds=self._input_dtype(x), attention_mask=m, position_ids=pos,
                                                past_key_values=cache, use_cache=True).last_hidden_state
                last = hidden[torch.arange(len(r), device=dev), answer[b] - start]
                logits = self._verbalize(last, label)
            out[rows_np] = logits.float().cpu().numpy()
            self._count(len(r), int(rest[rows_np % b_count].sum()), len(r) * width)

    def _count(self, rows: int, tokens: int, padded: int) -> None:
        self.forward_calls += 1
        self.rows_forwarded += rows
        self.tokens_forwarded += tokens
        self.padded_tokens_forwarded += padded

    def _input_dtype(self, x):
        """Inputs in the weights' dtype: a bf16 model keeps its residual stream in bf16 (as from
        its own embedding table); an fp32 model under autocast keeps it in fp32."""
        return x.to(self._model.dtype)

    def _autocast(self):
        from fedtune.models import autocast

        return autocast(self._device, self._amp_dtype)

    def _body(self, inputs_embeds, attention_mask):
        kw = {"use_cache": False} if self.kind == "causal" else {}
        return self._model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw).last_hidden_state

    def _verbalize(self, last, label):
        if self.kind == "causal":  # a linear head: only the verbalizer rows are needed
            w = self._head.weight[label]
            out = last @ w.to(last.dtype).T
            bias = getattr(self._head, "bias", None)
            return out + bias[label].to(out.dtype) if bias is not None else out
        return self._head(last)[:, label]


class _TooLong(Exception):
    def __init__(self, n: int):
        super().__init__(n)
        self.n = n

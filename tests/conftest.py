"""Shared fixtures: tiny randomly initialised models built from a config in the test
itself, with a small byte-level BPE tokenizer trained on the spot. No hub, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is 12 + 30? Answer with the number only. 42",
    "Rewrite in upper case: apple river APPLE RIVER",
    "Convert 3 km to m. 3000 Rewrite the date 2020-01-02 in the format DD/MM/YYYY. 02/01/2020",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: the movie was great bad good terrible It was . News",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]\":,./-+?!",
]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", mask_token="<mask>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama with hidden size 32 (or `hidden`), saved as a normal HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tiny_lora_trainer(model_path: Path, n_rows: int, train_overrides: list[str]):
    """A rank-4 LoRA slot (q/v, no dropout) on the tiny model at `model_path`, its tokenizer,
    `n_rows` copies of one short row, and the [train] section with `train_overrides`:
    (slot, tokenizer, rows, train config)."""
    from transformers import AutoModelForCausalLM

    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, Row, tokenize_rows
    from fedtune.fedit.lora import AdapterSlot, attach_lora
    from fedtune.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path)
    base.requires_grad_(False)
    slot = AdapterSlot(attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"]))
    tok = load_tokenizer(model_path)
    rows = tokenize_rows([Row("say hi", "", "hi there good", "x")] * n_rows, PromptFormatter("plain", tok), 64, False,
                         "error")
    return slot, tok, rows, C.load(None, train_overrides).train


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer RoBERTa masked LM (for black-box prompt tuning tests)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    path = tmp_path_factory.mktemp("tiny_roberta")
    tok = make_tokenizer(path)
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=520, pad_token_id=tok.pad_token_id,
                        type_vocab_size=1)
    RobertaForMaskedLM(cfg).save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def bpt_task(tmp_path) -> list[str]:
    """Config overrides for a two-class FedBPT task on the tiny Llama (its words are single
    tokens of the tiny tokenizer), with train and test files written under tmp_path."""
    import numpy as np

    rng = np.random.default_rng(0)
    pos, neg = ["the movie was great", "It was good", "good movie"], ["the movie was terrible", "It was bad", "bad news"]

    def rows(n, pos, neg):
        return [r for _ in range(n) for r in ({"sentence": str(rng.choice(pos)), "label": 1},
                                              {"sentence": str(rng.choice(neg)), "label": 0})]

    train = write_jsonl(tmp_path / "train.jsonl", rows(12, pos, neg))
    # test sentences that are not in the training file (a repeated one would be removed from training)
    test = write_jsonl(tmp_path / "test.jsonl", rows(4, ["good news", "It was great"], ["terrible movie", "bad"]))
    return ["run.algorithm='fedbpt'", "task.name='custom'", f"task.train_path={json.dumps(str(train))}",
            f"task.test_path={json.dumps(str(test))}", "task.text_columns=['sentence']",
            "task.template='<P> . {sentence} . It was <mask> .'", "task.verbalizer={0 = 'was', 1 = 'the'}",
            "task.k_shot=6", "task.dev_shots=2", "partition.method='iid'", "fedbpt.intrinsic_dim=8",
            "fedbpt.n_prompt_tokens=4", "fedbpt.popsize=4", "fedbpt.local_iter=2", "fedbpt.max_seq_len=32",
            "fedbpt.search=false"]  # the task's own start (the tests that search set it true)

import json

import pytest

from fedtune.data import skills
from fedtune.eval.metrics import normalize_answer
from fedtune.data.instructions import PromptFormatter, Row, load_rows, tokenize_rows
from fedtune.errors import DataError
from conftest import write_jsonl


def test_dolly_alpaca_and_columns(tmp_path):
    d = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "context": "c", "response": "r", "category": "qa"}])
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    c = write_jsonl(tmp_path / "c.jsonl", [{"q": "i", "ans": "o", "topic": "t"}])
    assert load_rows(str(d))[0] == Row("i", "c", "r", "qa", f"{d}:1")
    assert load_rows(str(a))[0].output == "o" and load_rows(str(a))[0].category == "all"
    r = load_rows(str(c), "columns", {"instruction": "q", "output": "ans", "category": "topic"})[0]
    assert (r.instruction, r.output, r.category) == ("i", "o", "t")


def test_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "response": "r"}, '{"instruction": "i", "resp'])
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed JSON"):
        load_rows(str(p))


def test_missing_field_and_bad_utf8_and_empty(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "i", "response": "r"}, {"instruction": "j"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'response'"):
        load_rows(str(p))
    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"instruction": "i", "response": "r"}\n{"instruction": "\xff\xfe", "response": "r"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid UTF-8"):
        load_rows(str(b))
    e = tmp_path / "e.jsonl"
    e.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(e))
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "none.jsonl"))


def test_cutoff_shorter_than_prompt_is_an_error(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fmt = PromptFormatter("alpaca", tok)
    rows = [Row("What is 12 + 30?", "", "42", "a", "f.jsonl:7")]
    with pytest.raises(DataError, match=r"f\.jsonl:7: the prompt is \d+ tokens"):
        tokenize_rows(rows, fmt, 16, False)
    assert tokenize_rows(rows, fmt, 16, False, too_long="drop") == []
    t = tokenize_rows(rows, fmt, 512, False)[0]
    n_prompt = len(tok(fmt.prompt("What is 12 + 30?"))["input_ids"])
    assert t.labels[:n_prompt] == [-100] * n_prompt and t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert t.input_ids[-1] == tok.eos_token_id
    assert tokenize_rows(rows, fmt, 512, True)[0].labels == t.input_ids


def test_chat_template_prompt(tiny_llama):
    from transformers import AutoTokenizer

    fmt = PromptFormatter("chat", AutoTokenizer.from_pretrained(tiny_llama))
    assert fmt.prompt("hi").endswith("<|im_start|>assistant\n")


def test_skills_are_deterministic_and_correct():
    a = skills.generate(30, seed=1)
    assert a == skills.generate(30, seed=1)
    assert len(a) == 30 * len(skills.SKILLS)
    for r in a:
        if r.category == "arithmetic":
            expr = r.instruction.split("What is ")[1].split("?")[0]
            assert str(eval(expr)) == r.output
        if r.category == "to_json":
            assert set(json.loads(r.output)) == {"name", "age", "city"}
    assert normalize_answer(" 42.\nmore") == "42"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_instruction_file_with_a_utf8_byte_order_mark_loads(tmp_path, suffix):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi", "category": "greet"}]
    text = "\n".join(json.dumps(r) for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    p = tmp_path / f"bom{suffix}"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (row,) = load_rows(str(p))
    assert row.instruction == "Say hi" and row.output == "hi"


def test_test_rows_repeated_in_training_are_removed_by_normalized_text(tmp_path):
    from fedtune import config as C
    from fedtune.fedit.session import prepare_data

    train = [{"instruction": f"Q{i}", "input": "", "output": f"a{i}", "category": "x"} for i in range(20)]
    train += [{"instruction": "  what is   THE capital of France?! ", "input": "", "output": "Paris, of course",
               "category": "x"}]
    test = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris", "category": "x"}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    cfg = C.load(None, [f"data.path={str(tmp_path / 'train.jsonl')!r}", f"data.test_path={str(tmp_path / 'test.jsonl')!r}",
                        "partition.num_clients=2", "partition.method='iid'"])
    data = prepare_data(cfg)
    assert data.overlap_removed == 1 and len(data.rows) == 20
    assert all("capital" not in r.instruction for r in data.rows)


def test_conversations_in_openai_and_sharegpt_form_become_rows(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                      {"role": "assistant", "content": "6"}], "category": "math"}])
    rows = load_rows(str(chat))  # detected from the first record
    assert rows[0] == Row("Capital of France?", "", "Paris", "all", f"{chat}:1")
    assert rows[1] == Row("and 3+3?", "System: Be brief.\n\nUser: 2+2?\n\nAssistant: 4", "6", "math", f"{chat}:2")
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    r = load_rows(str(share), "messages")[0]
    assert (r.instruction, r.input, r.output) == ("hi", "", "hello")


def test_a_conversation_that_does_not_end_with_the_assistant_names_the_record(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: a conversation must end with a user turn and the assistant's "
                                        r"reply .* user -> assistant -> user"):
        load_rows(str(p))
    q = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                          {"role": "robot", "content": "b"}]}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: messages\[1\]: 'role' is 'robot'"):
        load_rows(str(q))
    with pytest.raises(DataError, match=r"q\.jsonl: unknown data format 'sharegpt'"):
        load_rows(str(q), "sharegpt")

"""Instruction data: reading JSON/JSONL files in the Dolly or Alpaca schema (or mapped
columns), prompt templates, and tokenization with prompt masking.

Internally every row is a `Row`: instruction, input, output, category, and where it came
from (`file:line`) so that any later error can point back at the source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.data import conversations, hub
from fedtune.errors import DataError

ROLES = ("instruction", "input", "output", "category")
SCHEMAS = {
    "dolly": {"instruction": "instruction", "input": "context", "output": "response", "category": "category"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "category": "category"},
}


@dataclass(frozen=True)
class Row:
    instruction: str
    input: str
    output: str
    category: str
    source: str = ""

    def to_json(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output, "category": self.category}

    def key(self) -> tuple[str, str, str]:
        return (self.instruction, self.input, self.output)

    def norm_key(self) -> tuple[str, str]:
        """The question, normalized (case, whitespace, punctuation): two rows with the same
        norm_key ask the same thing, whatever their answers (Dolly repeats instructions)."""
        return (normalize_text(self.instruction), normalize_text(self.input))


def normalize_text(text: str) -> str:
    """Case-folded, punctuation and runs of whitespace removed: how duplicates are recognised."""
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.casefold())
    return " ".join(kept.split())


# ----------------------------------------------------------------------------- reading


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """Return (source, record) pairs from a .json (list of objects) or .jsonl file."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as Windows tools write it: not data
        raw = raw[3:]
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".json":
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of 5,000 digits; arrays nested 100,000 deep
            raise DataError(f"{path}: unreadable JSON: {_json_problem(e)}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
        return [(f"{path}[{i}]", r) for i, r in enumerate(obj)]
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
        try:
            out.append((where, json.loads(text)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{where}: unreadable JSON: {_json_problem(e)}") from None
    return out


def _json_problem(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]


def _detect_schema(records: list[tuple[str, dict]], path: str) -> dict:
    if not records:
        raise DataError(f"{path}: no records (an empty list)")
    first_where, first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{first_where}: expected a JSON object, got {type(first).__name__}")
    if "response" in first:
        return SCHEMAS["dolly"]
    if "output" in first:
        return SCHEMAS["alpaca"]
    raise DataError(
        f"{first_where}: cannot tell the schema: expected Dolly fields (instruction, context, response), "
        f"Alpaca fields (instruction, input, output) or a conversation (messages or conversations); "
        f"found {', '.join(sorted(first))}. "
        "Set data.format = 'columns' and data.columns = {instruction = ..., output = ...}"
    )


def rows_from_records(records: list[tuple[str, dict]], mapping: dict, path: str) -> list[Row]:
    rows = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        vals = {}
        for role in ROLES:
            field_name = mapping.get(role)
            value = rec.get(field_name, None) if field_name else None
            if value is None:
                if role in ("instruction", "output"):
                    raise DataError(f"{where}: missing field '{field_name}' ({role})")
                value = "" if role == "input" else "all"
            if not isinstance(value, str):
                if role == "category" and isinstance(value, (int, float)):
                    value = str(value)
                else:
                    raise DataError(f"{where}: field '{field_name}' must be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can take it
                raise DataError(f"{where}: field '{field_name}' holds an invalid escape "
                                f"{value[e.start]!r} at character {e.start}") from None
            vals[role] = value
        if not vals["instruction"].strip():
            raise DataError(f"{where}: field '{mapping['instruction']}' is empty")
        rows.append(Row(vals["instruction"], vals["input"], vals["output"], vals["category"] or "all", where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_rows(path: str, fmt: str = "auto", columns: dict | None = None) -> list[Row]:
    """Read instruction rows from a file (or a Hugging Face dataset: hub:DATASET[@CONFIG][:SPLIT])."""
    if path.startswith(hub.PREFIX):
        records = hub.load_records(path)
        source = path
    else:
        p = Path(path).expanduser()
        if p.suffix not in (".json", ".jsonl"):
            raise DataError(f"{p}: expected a .json or .jsonl file (or hub:DATASET[@CONFIG][:SPLIT], or demo:skills)")
        records = _read_records(p)
        source = str(p)
    if fmt == "auto" and records and conversations.is_conversation(records[0][1]):
        fmt = "messages"
    if fmt == "messages":
        records = [(where, conversations.flatten(rec, where)) for where, rec in records]
        mapping = SCHEMAS["alpaca"]
    elif fmt == "columns":
        mapping = {r: (columns or {}).get(r) for r in ROLES}
    elif fmt == "auto":
        mapping = _detect_schema(records, source)
    elif fmt in SCHEMAS:
        mapping = SCHEMAS[fmt]
    else:
        raise DataError(f"{source}: unknown data format {fmt!r} (auto, dolly, alpaca, messages, columns)")
    return rows_from_records(records, mapping, source)


def write_jsonl(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- templates

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class PromptFormatter:
    """Turns a row into (prompt text, response text) under a named template."""

    def __init__(self, template: str, tokenizer):
        self.template = template
        self.tokenizer = tokenizer
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template = 'chat' but the model's tokenizer has no chat template; use 'alpaca'")

    def prompt(self, instruction: str, input: str = "") -> str:
        if self.template == "alpaca":
            t = ALPACA_WITH_INPUT if input.strip() else ALPACA_NO_INPUT
            return t.format(instruction=instruction, input=input)
        if self.template == "plain":
            return f"{instruction}\n{input}\n" if input.strip() else f"{instruction}\n"
        content = f"{instruction}\n\n{input}" if input.strip() else instruction
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    @property
    def adds_special_tokens(self) -> bool:
        # a chat template already writes the model's special tokens into the text
        return self.template != "chat"


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_rows(rows: list[Row], fmt: PromptFormatter, cutoff_len: int, train_on_inputs: bool,
                  too_long: str = "error") -> list[Tokenized]:
    """Tokenize prompt + response + EOS; the prompt is masked out of the loss unless train_on_inputs.

    A row whose prompt alone does not fit in `cutoff_len` would have nothing to learn from:
    too_long = 'error' stops with the row's source; 'drop' leaves such rows out.
    """
    tok = fmt.tokenizer
    eos = tok.eos_token or ""
    out: list[Tokenized] = []
    too_long_rows = []
    prompts = [fmt.prompt(r.instruction, r.input) for r in rows]
    p_ids = tok(prompts, add_special_tokens=fmt.adds_special_tokens)["input_ids"]
    r_ids = tok([r.output + eos for r in rows], add_special_tokens=False)["input_ids"]
    for row, p, r in zip(rows, p_ids, r_ids):
        if len(p) >= cutoff_len:
            too_long_rows.append((row, len(p)))
            continue
        ids = (p + r)[:cutoff_len]
        labels = ids.copy() if train_on_inputs else ([-100] * len(p) + r)[:cutoff_len]
        out.append(Tokenized(ids, labels))
    if too_long_rows and too_long == "error":
        row, n = too_long_rows[0]
        raise DataError(
            f"{row.source}: the prompt is {n} tokens, but data.cutoff_len = {cutoff_len} leaves no room for the response "
            f"({len(too_long_rows)} row(s) like this). Raise data.cutoff_len or set data.too_long = 'drop'"
        )
    return out

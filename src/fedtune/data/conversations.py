"""Conversation records as instruction rows: the chat format of OpenAI and TRL
(`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`) and
ShareGPT's (`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`).

The last turn is the response the model learns (it must be the assistant's), the user turn
before it is the instruction, and whatever came earlier (a system message, earlier exchanges)
is the row's input, written out as a transcript, so that every prompt template (Alpaca,
chat, plain) shows the model the conversation so far. Every failure names the record and turn.
"""

from __future__ import annotations

from fedtune.errors import DataError

FIELDS = ("messages", "conversations")  # the list's name in each of the two formats
# ShareGPT's speaker names (and OpenAI's roles) -> role
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
SPEAKER = {"system": "System", "user": "User", "assistant": "Assistant"}


def is_conversation(record) -> bool:
    return isinstance(record, dict) and any(isinstance(record.get(f), list) for f in FIELDS)


def _turns(rec: dict, where: str) -> list[tuple[str, str]]:
    name = next((f for f in FIELDS if f in rec), None)
    if name is None:
        raise DataError(f"{where}: expected a conversation in a 'messages' or 'conversations' list; "
                        f"found fields {', '.join(sorted(map(str, rec)))}")
    turns = rec[name]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{name}' must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        at = f"{where}: {name}[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{at}: expected an object, got {type(t).__name__}")
        who_key, text_key = ("role", "content") if "role" in t else ("from", "value")
        who, text = t.get(who_key), t.get(text_key)
        if not isinstance(who, str) or who.lower() not in ROLES:
            raise DataError(f"{at}: '{who_key}' is {who!r}; expected one of {', '.join(sorted(ROLES))}")
        if not isinstance(text, str):
            raise DataError(f"{at}: '{text_key}' must be a string, got {type(text).__name__}")
        out.append((ROLES[who.lower()], text))
    return out


def flatten(rec: dict, where: str) -> dict:
    """One conversation as an Alpaca-schema record (instruction, input, output, category)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    turns = _turns(rec, where)
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        roles = " -> ".join(r for r, _ in turns)
        raise DataError(f"{where}: a conversation must end with a user turn and the assistant's reply "
                        f"(the reply is what the model learns); its turns are {roles}")
    history = "\n\n".join(f"{SPEAKER[r]}: {text}" for r, text in turns[:-2])
    out = {"instruction": turns[-2][1], "input": history, "output": turns[-1][1]}
    if "category" in rec:
        out["category"] = rec["category"]
    return out

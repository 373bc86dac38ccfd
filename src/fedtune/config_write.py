"""Writing a Config as TOML: every key under its documentation comment, values by tomli-w."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.config_schema import SECTION_DOCS, Config
from fedtune.core import atomic


def _toml_line(key: str, value: Any) -> str:
    """`key = value` as TOML, written by tomli-w (quoting, escapes, control characters); a
    table value, or a list that holds one (tomli-w would write a list of tables as `[[key]]`
    sections, outside the section the key belongs to), is written inline so that it stays under
    its commented key."""
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value)):
        return f"{_toml_key(key)} = {_toml_inline(value)}"
    return tomli_w.dumps({key: value}).rstrip("\n")


def _toml_key(key: str) -> str:
    return tomli_w.dumps({key: 0})[: -len(" = 0\n")]


def _toml_inline(value: Any) -> str:
    """A value on one line (TOML inline tables are one line): tables and arrays inline, each
    key and scalar written by tomli-w."""
    if isinstance(value, dict):
        items = [f"{_toml_key(str(k))} = {_toml_inline(v)}" for k, v in value.items()]
        return f"{{ {', '.join(items)} }}" if items else "{}"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_toml_inline(v) for v in value)}]"
    return tomli_w.dumps({"v": value})[len("v = "):].rstrip("\n")


def to_toml(cfg: Config, comments: bool = True) -> str:
    lines: list[str] = []
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        if comments:
            lines.append(f"# {SECTION_DOCS.get(sec.name, '')}")
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            if comments:
                lines.append(f"# {f.metadata.get('doc', '')}")
            lines.append(_toml_line(f.name, getattr(section, f.name)))
        lines.append("")
    return "\n".join(lines)


def save(cfg: Config, path: str | Path) -> None:
    atomic.write_text(path, to_toml(cfg, comments=True))

"""The demo's federated instruction data: skills whose answers can be checked exactly.

Generated here, from a seed, offline; each row's category is its skill, so category
partitioning gives each client one or two skills (non-IID).
"""

from __future__ import annotations

import json

import numpy as np

from fedtune.data.instructions import Row

WORDS = (
    "apple river stone cloud green silver tiger paper window garden music orange planet candle "
    "forest bridge yellow rocket pencil winter summer ocean castle dragon marble button coffee "
    "violet thunder meadow lantern copper falcon harbor island jacket kettle ladder mirror "
    "needle pepper quartz saddle tunnel velvet walnut zebra anchor basket cherry"
).split()
NAMES = "Ann Ben Cara Dan Eva Finn Gia Hugo Ivy Jon Kira Leo Mia Noah Olga Paul Rosa Sam Tara Uma".split()
CITIES = "Oslo Lima Rome Cairo Delhi Paris Quito Seoul Tokyo Vienna".split()


def _arithmetic(rng):
    a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Answer with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}? Answer with the number only.", str(a - b)


def _uppercase(rng):
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 4)), replace=False))
    return f"Rewrite in upper case: {words}", words.upper()


UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("L", "mL", 1000), ("min", "s", 60)]


def _units(rng):
    src, dst, f = UNITS[int(rng.integers(len(UNITS)))]
    x = int(rng.integers(2, 40))
    return f"Convert {x} {src} to {dst}. Answer with the number only.", str(x * f)


def _date_format(rng):
    y, m, d = int(rng.integers(1950, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return f"Rewrite the date {y:04d}-{m:02d}-{d:02d} in the format DD/MM/YYYY.", f"{d:02d}/{m:02d}/{y:04d}"


def _to_json(rng):
    name, city, age = str(rng.choice(NAMES)), str(rng.choice(CITIES)), int(rng.integers(18, 90))
    return (f"Convert to JSON with keys name, age, city: {name} is {age} years old and lives in {city}.",
            json.dumps({"name": name, "age": age, "city": city}))


def _sort(rng):
    nums = rng.choice(np.arange(1, 100), size=int(rng.integers(3, 6)), replace=False)
    return (f"Sort these numbers from smallest to largest: {', '.join(str(int(x)) for x in nums)}",
            ", ".join(str(int(x)) for x in sorted(nums)))


SKILLS = {
    "arithmetic": _arithmetic,
    "uppercase": _uppercase,
    "unit_conversion": _units,
    "date_format": _date_format,
    "to_json": _to_json,
    "sort_numbers": _sort,
}


def generate(rows_per_skill: int, seed: int) -> list[Row]:
    """Deterministic rows for every skill; no two rows of a skill share an instruction."""
    rows: list[Row] = []
    for s_i, (skill, make) in enumerate(SKILLS.items()):
        rng = np.random.default_rng([seed, s_i])
        seen: set[str] = set()
        tries = 0
        while len(seen) < rows_per_skill and tries < rows_per_skill * 50:
            tries += 1
            q, a = make(rng)
            if q in seen:
                continue
            seen.add(q)
            rows.append(Row(q, "", a, skill, f"demo:skills/{skill}#{len(seen)}"))
    return rows

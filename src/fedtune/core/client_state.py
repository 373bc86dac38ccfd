"""State a client keeps between the rounds it takes part in (SCAFFOLD's control variate, say),
on disk, one small safetensors file per client and round, never all in memory.

Each file is named by the round that wrote it, and a client in round r reads the newest one
from an earlier round: a run resumed after a crash in round r (the checkpoint says r - 1)
reruns round r from the same client state, whatever files round r had already written. Only
the two newest files per client are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtune.core import arrays as A
from fedtune.core import atomic

_NAME = re.compile(r"^r(\d{6})\.safetensors$")


class ClientStateStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _dir(self, client_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)
        return self.folder / safe

    def _versions(self, client_id: str) -> list[tuple[int, Path]]:
        d = self._dir(client_id)
        if not d.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def load(self, client_id: str, before_round: int) -> A.Arrays | None:
        """The newest state this client saved in a round before `before_round`, or None."""
        older = [p for r, p in self._versions(client_id) if r < before_round]
        return A.unpack(older[-1].read_bytes()) if older else None

    def save(self, client_id: str, rnd: int, arrays: A.Arrays) -> None:
        atomic.write_bytes(self._dir(client_id) / f"r{rnd:06d}.safetensors", A.pack(arrays))
        for _, p in self._versions(client_id)[:-2]:
            p.unlink(missing_ok=True)

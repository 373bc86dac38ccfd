"""FedIT client: every simulated client shares one frozen base model and swaps adapters.

Each `fit` starts exactly from the global adapter it is given (strict load), trains on the
client's own pre-tokenized rows, and returns a copy of the trained adapter.
"""

from __future__ import annotations

import torch

from fedtune.core.seeds import derive_seed
from fedtune.core.strategy import FitIns, FitRes
from fedtune.data.instructions import Tokenized
from fedtune.fedit.lora import AdapterSlot
from fedtune.fedit.train import local_steps, train_local


class FedITClientApp:
    def __init__(self, slot: AdapterSlot, data: dict[str, list[Tokenized]], train_cfg, *, seed: int, pad_id: int,
                 device, amp, progress_factory=None):
        self.slot = slot
        self.data = data
        self.train_cfg = train_cfg
        self.seed = seed
        self.pad_id = pad_id
        self.device = device
        self.amp = amp
        self.progress_factory = progress_factory  # (client_id, total_steps) -> callback(step, loss) with .close()
        self.client_index = {cid: i for i, cid in enumerate(sorted(data))}

    def fit(self, client_id: str, ins: FitIns) -> FitRes:
        rows = self.data.get(client_id)
        if not rows:
            raise KeyError(f"client '{client_id}' holds no data in this process")
        rnd = int(ins.config.get("round", 0))
        self.slot.set(ins.arrays)
        torch.manual_seed(derive_seed(self.seed, rnd, self.client_index[client_id], 1))  # LoRA dropout
        params = list(self.slot.params.values())
        bar = self.progress_factory(client_id, local_steps(len(rows), self.train_cfg)) if self.progress_factory else None
        try:
            stats = train_local(self.slot.model, params, rows, self.train_cfg,
                                seed=derive_seed(self.seed, rnd, self.client_index[client_id]), pad_id=self.pad_id,
                                device=self.device, amp=self.amp, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        return FitRes(client_id, self.slot.get(), len(rows), {
            "train_loss": stats.loss, "steps": stats.steps, "examples_seen": stats.examples_seen,
            "tokens": stats.tokens, "compute_seconds": stats.compute_seconds, "train_seconds": stats.seconds,
        })


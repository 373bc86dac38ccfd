"""FedIT client: every simulated client shares one frozen base model and swaps adapters.

Each `fit` starts exactly from the global adapter it is given (strict load), trains on the
client's own pre-tokenized rows, and returns a copy of the trained adapter.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtune.core.client_state import ClientStateStore
from fedtune.core.lora_math import split_stack
from fedtune.core.seeds import derive_seed
from fedtune.core.strategy import FitIns, FitRes
from fedtune.data.instructions import Tokenized
from fedtune.errors import UpdateRejected
from fedtune.fedit.flora import applied
from fedtune.fedit.lora import AdapterSlot, is_b
from fedtune.fedit.scaffold import VARIATE_PREFIX, split_variates
from fedtune.fedit.train import local_steps, train_local


class FedITClientApp:
    def __init__(self, slot: AdapterSlot | dict[int, AdapterSlot], data: dict[str, list[Tokenized]], train_cfg, *, seed: int, pad_id: int,
                 device, amp, progress_factory=None, state_store: ClientStateStore | None = None,
                 freeze_a: bool = False, personal_b: bool = False, rounds: int = 0):
        self.slots = slot if isinstance(slot, dict) else {slot.rank: slot}  # by LoRA rank (heterogeneous ranks)
        self.slot = self.slots[max(self.slots)]
        self.data = data
        self.train_cfg = train_cfg
        self.seed = seed
        self.pad_id = pad_id
        self.device = device
        self.amp = amp
        self.progress_factory = progress_factory  # (client_id, total_steps) -> callback(step, loss) with .close()
        self.client_index = {cid: i for i, cid in enumerate(sorted(data))}
        self.state_store = state_store  # where SCAFFOLD's client control variates live between rounds
        self.rounds = rounds  # run.rounds: where a round sits in a schedule that spans the run (train.schedule_span)
        self.freeze_a = freeze_a  # FFA-LoRA: A stays at its shared initial value; only B trains
        self.personal_b = personal_b  # FedSA-LoRA: A is shared, each client keeps its own B (in state_store)
        if personal_b and state_store is None:
            raise RuntimeError("FedSA-LoRA keeps each client's B in a ClientStateStore; none was given")

    def fit(self, client_id: str, ins: FitIns) -> FitRes:
        rows = self.data.get(client_id)
        if not rows:
            raise KeyError(f"client '{client_id}' holds no data in this process")
        rnd = int(ins.config.get("round", 0))
        adapter, server_c = split_variates(ins.arrays)
        adapter, stack = split_stack(adapter)  # FLoRA: the earlier rounds' stacked factors, frozen
        sent = adapter
        if self.personal_b and (own := self.state_store.load(client_id, rnd)) is not None:
            adapter = {**adapter, **own}  # FedSA-LoRA: this client's own B, from its last round
        self.slot = self._slot_for(adapter)  # the server decides each client's rank; the adapter says which
        self.slot.set(adapter)
        torch.manual_seed(derive_seed(self.seed, rnd, self.client_index[client_id], 1))  # LoRA dropout
        keys = [k for k in self.slot.params if not (self.freeze_a and ".lora_A." in k)]
        params = [self.slot.params[k] for k in keys]
        correction, client_c = None, None
        if server_c is not None:  # SCAFFOLD: every step's gradient gets c - c_i
            client_c = self._client_variate(client_id, rnd, server_c)
            correction = [torch.from_numpy(server_c[k] - client_c[k]).to(self.device) for k in keys]
        frozen = [p for k, p in self.slot.params.items() if k not in keys]
        for p in frozen:
            p.requires_grad_(False)
        bar = self.progress_factory(client_id, local_steps(len(rows), self.train_cfg)) if self.progress_factory else None
        try:
            with applied(self.slot.model, stack, self.slot.adapter, self.device):
                stats = train_local(self.slot.model, params, rows, self.train_cfg,
                                    seed=derive_seed(self.seed, rnd, self.client_index[client_id]), pad_id=self.pad_id,
                                    device=self.device, amp=self.amp, progress=bar, correction=correction,
                                    run_position=(rnd, self.rounds))
        finally:
            for p in frozen:
                p.requires_grad_(True)
            if bar is not None:
                bar.close()
        reply = self.slot.get()
        if self.personal_b:  # B stays here; the reply carries back the B that was sent, unchanged
            self.state_store.save(client_id, rnd, {k: reply[k] for k in reply if is_b(k)})
            reply.update({k: sent[k] for k in reply if is_b(k)})
        if server_c is not None:
            # option II of Karimireddy et al. (2020): c_i+ = c_i - c + (x - y) / (K lr), K lr = the summed step sizes
            new_c = {k: (client_c[k] - server_c[k] + (adapter[k] - reply[k]) / stats.lr_sum).astype(np.float32)
                     for k in reply}
            self.state_store.save(client_id, rnd, new_c)
            reply.update({VARIATE_PREFIX + k: new_c[k] - client_c[k] for k in reply})  # the server gets delta c_i
        return FitRes(client_id, reply, len(rows), {
            "train_loss": stats.loss, "steps": stats.steps, "examples_seen": stats.examples_seen,
            "tokens": stats.tokens, "compute_seconds": stats.compute_seconds, "train_seconds": stats.seconds,
            **({"dpsgd_clipped": stats.dpsgd_clipped} if getattr(self.train_cfg, "dpsgd_noise_multiplier", 0) > 0 else {}),
        })

    def _slot_for(self, adapter) -> AdapterSlot:
        ranks = {v.shape[0] for k, v in adapter.items() if ".lora_A." in k}
        if len(ranks) != 1 or next(iter(ranks)) not in self.slots:
            raise UpdateRejected(f"adapter of LoRA rank {sorted(ranks)}: this client holds ranks {sorted(self.slots)} "
                                 f"(lora.r and lora.client_ranks)")
        return self.slots[next(iter(ranks))]

    def _client_variate(self, client_id: str, rnd: int, like: dict) -> dict:
        if self.state_store is None:
            raise RuntimeError("SCAFFOLD needs a place for the client control variates (a ClientStateStore)")
        saved = self.state_store.load(client_id, rnd)
        return saved if saved is not None else {k: np.zeros_like(v) for k, v in like.items()}

"""The client's side of secure aggregation (see fedtune.core.secagg): a wrapper around any
client app. It trains with the inner app in exchange 0 and keeps the update to itself; the
other exchanges carry only keys, sealed shares, one masked vector and shares for unmasking.
A client refuses a server that asks for both secrets of one client, or that names fewer
survivors than the threshold (it could then unmask a single client's input)."""

from __future__ import annotations

import os

import numpy as np

from fedtune.core import secagg_crypto as X
from fedtune.core.secagg import PHASE, mask_info, flatten, sign
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import UpdateRejected

SHARE_INFO = b"fedtune-secagg share"


def _aad(rnd: int, sender: str, recipient: str) -> bytes:
    return f"fedtune-secagg|{rnd}|{sender}|{recipient}".encode()


class SecAggClient:
    def __init__(self, inner, max_weight: int = 0, unit_weight: bool = False):
        self.inner = inner
        self.max_weight = max_weight  # a client's weight is bounded here: the server cannot check it
        self.unit_weight = unit_weight  # distributed DP: every client weighs 1
        self.state: dict[tuple[str, int], dict] = {}

    def fit(self, cid: str, ins: FitIns) -> FitRes:
        phase = ins.config.get(PHASE)
        if phase is None:
            return self.inner.fit(cid, ins)
        rnd = int(ins.config["round"])
        if phase == 0:
            return self._train(cid, rnd, ins)
        st = self.state.get((cid, rnd))
        if st is None:
            raise UpdateRejected(f"secure aggregation: {cid} holds no state for round {rnd} (exchange {phase})")
        if phase == 1:
            return self._share(cid, rnd, st, ins)
        if phase == 2:
            return self._mask(cid, rnd, st, ins)
        if phase == 3:
            return self._unmask(cid, rnd, st, ins)
        raise UpdateRejected(f"secure aggregation: no exchange {phase}")

    def _train(self, cid: str, rnd: int, ins: FitIns) -> FitRes:
        res = self.inner.fit(cid, ins)
        weight = min(res.num_examples, self.max_weight) if self.max_weight else res.num_examples
        if self.unit_weight:
            weight = 1
        c_sk, c_pk = X.new_keypair()
        s_sk, s_pk = X.new_keypair()
        self.state = {k: v for k, v in self.state.items() if k[0] != cid}  # one round at a time per client
        self.state[(cid, rnd)] = {"vec": flatten(res.arrays, float(weight)), "c_sk": c_sk, "s_sk": s_sk,
                                  "b": os.urandom(X.SEED_BYTES)}
        return FitRes(cid, {"c_pk": c_pk, "s_pk": s_pk}, res.num_examples, res.metrics)

    def _share(self, cid: str, rnd: int, st: dict, ins: FitIns) -> FitRes:
        nbrs, t = list(ins.config["neighbours"]), int(ins.config["threshold"])
        st["t"] = t
        st["pk"] = {j: (ins.arrays[f"c_pk/{j}"], ins.arrays[f"s_pk/{j}"]) for j in nbrs}
        sk = X.private_bytes(st["s_sk"])
        b_sh = X.split_secret(st["b"], t, len(nbrs))
        lo_sh = X.split_secret(sk[:X.SEED_BYTES], t, len(nbrs))
        hi_sh = X.split_secret(sk[X.SEED_BYTES:], t, len(nbrs))
        out = {}
        for n, j in enumerate(nbrs):
            plain = bytes([b_sh[n][0]]) + b_sh[n][1] + lo_sh[n][1] + hi_sh[n][1]
            key = X.agree(st["c_sk"], st["pk"][j][0], SHARE_INFO)
            out[f"ct/{j}"] = X.seal(key, plain, _aad(rnd, cid, j))
        return FitRes(cid, out, 1, {})

    def _mask(self, cid: str, rnd: int, st: dict, ins: FitIns) -> FitRes:
        alive = list(ins.config["alive"])
        st["ct"] = {j: ins.arrays[f"ct/{j}"] for j in alive}
        n = st["vec"].size
        masked = X.encode(st["vec"]) + X.prg(st["b"], n)
        for j in alive:
            m = X.prg(X.agree(st["s_sk"], st["pk"][j][1], mask_info(rnd, cid, j)), n)
            masked = masked + m if sign(cid, j) > 0 else masked - m
        del st["vec"]  # the update is gone once it is masked
        return FitRes(cid, {"masked": masked}, 1, {})

    def _unmask(self, cid: str, rnd: int, st: dict, ins: FitIns) -> FitRes:
        surv, gone = list(ins.config["survivors"]), list(ins.config["dropped"])
        if set(surv) & set(gone):
            raise UpdateRejected(f"secure aggregation: the server asked for both secrets of {sorted(set(surv) & set(gone))}")
        if len(surv) + 1 < st["t"]:  # with fewer survivors the sum would reveal too few clients' inputs
            raise UpdateRejected(f"secure aggregation: {len(surv)} surviving neighbours named, fewer than the threshold")
        out = {}
        for j in surv + gone:
            sealed = st["ct"].get(j)
            if sealed is None:
                continue  # j never sent me a share
            key = X.agree(st["c_sk"], st["pk"][j][0], SHARE_INFO)
            try:
                plain = X.open_sealed(key, sealed, _aad(rnd, j, cid))
            except Exception:
                raise UpdateRejected(f"secure aggregation: the share from {j} does not authenticate "
                                     "(altered, or replayed from another round)") from None
            idx, b, lo, hi = plain[0], plain[1:17], plain[17:33], plain[33:49]
            if j in surv:
                out[f"b/{j}"] = np.frombuffer(bytes([idx]) + b, dtype=np.uint8).copy()
            else:
                out[f"s/{j}"] = np.frombuffer(bytes([idx]) + lo + hi, dtype=np.uint8).copy()
        del self.state[(cid, rnd)]
        return FitRes(cid, out or {"nothing": np.zeros(1, np.uint8)}, 1, {})

"""Secure aggregation in the style of SecAgg+ (Bell et al., CCS 2020): the server learns only
the weighted sum of the surviving clients' updates.

One round is four exchanges on the round driver (`Aggregator.next_exchange`):

0. fit: each client trains, keeps its update to itself, and sends two X25519 public keys;
1. share keys: the server sends each client its neighbours' keys (a random ring of
   `neighbours` clients per round, all of them when 0); the client draws a self-mask seed b_i
   and Shamir-shares b_i and its mask private key among its neighbours (threshold t), each
   share sealed with AES-GCM under a key only that neighbour can derive (bound to sender,
   recipient and round);
2. masked input: the server routes the sealed shares; each client sends its fixed-point
   encoded vector (w_i * update, then w_i) plus PRG(b_i) plus, per neighbour j still in the
   protocol, +-PRG(agreed key s_ij) (+ when i < j): every entry is uniform modulo 2^64;
3. unmask: the server names the survivors and the dropped; each survivor returns its
   shares of the survivors' b_j and of the dropped clients' mask keys (never both for one
   client). With t shares of each, the server removes the self-masks and the dropped
   clients' pairwise masks; what is left is the sum, and the weighted mean follows.

A client lost after step 1 is recovered if t of its neighbours answer step 3; otherwise the
round fails with an error naming who, and the run stays resumable from the last checkpoint.
Crypto primitives: `fedtune.core.secagg_crypto` (cryptography, pycryptodome).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.core import secagg_crypto as X
from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import FedtuneError, UpdateRejected

PHASE = "secagg_phase"


class SecAggFailed(FedtuneError):
    """Too few clients answered for the masks to be removed."""


@dataclass(frozen=True)
class SecAggSettings:
    neighbours: int = 0  # k: each client's neighbours in the masking graph (0 = every other client)
    threshold: int = 0  # t: shares needed to reconstruct a secret (0 = k // 2 + 1)


def neighbours(ids: list[str], k: int, seed: int, rnd: int) -> dict[str, list[str]]:
    """A symmetric graph over the clients: all pairs (k = 0 or k >= n - 1), else a ring in a
    random order for this round with k // 2 neighbours on each side."""
    ids = sorted(ids)
    n = len(ids)
    if k == 0 or k >= n - 1:
        return {i: [j for j in ids if j != i] for i in ids}
    order = [ids[x] for x in np.random.default_rng([seed, rnd, 0x5A]).permutation(n)]
    pos = {c: p for p, c in enumerate(order)}
    half = max(1, k // 2)
    return {c: sorted({order[(pos[c] + d) % n] for d in range(-half, half + 1) if d} - {c}) for c in ids}


def threshold_for(s: SecAggSettings, degree: int) -> int:
    t = s.threshold or degree // 2 + 1
    return max(1, min(t, degree))


def flatten(arrays: Arrays, weight: float) -> np.ndarray:
    """The vector a client masks: weight * every array (sorted by name), then the weight."""
    return np.concatenate([weight * arrays[k].astype(np.float64).ravel() for k in sorted(arrays)] + [[weight]])


def sign(i: str, j: str) -> int:
    return 1 if i < j else -1


def _bytes_array(arrays: Arrays, key: str, size: int | None = None) -> np.ndarray:
    v = arrays.get(key)
    if v is None or v.dtype != np.uint8 or v.ndim != 1 or (size is not None and v.shape != (size,)):
        raise UpdateRejected(f"secure aggregation: '{key}' must be uint8[{size or '...'}]")
    return v


class SecAggFold:
    """The server's side of one round (an Aggregator with four exchanges)."""

    def __init__(self, strategy, global_arrays: Arrays, rnd: int, settings: SecAggSettings, seed: int,
                 layout: Arrays | None = None, finish=None):
        """layout: the arrays each client's masked vector holds (default: the global arrays);
        finish(sums, weight, survivors) -> (next global arrays, metrics) (default: the
        weighted mean through the strategy's server step)."""
        self.strategy, self.g, self.rnd, self.s, self.seed = strategy, global_arrays, rnd, settings, seed
        self.layout = layout if layout is not None else global_arrays
        self.finish = finish
        self.pk: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # client: (c_pk, s_pk)
        self.phase, self.graph, self.t = 0, {}, 0
        self.u1: dict[str, Arrays] = {}  # client: its sealed shares, by recipient
        self.total: np.ndarray | None = None
        self.u2: list[str] = []
        self.shares: dict[tuple[str, str], list[tuple[int, bytes]]] = {}  # (kind, owner): shares
        self.lost_at: dict[str, int] = {}

    def add(self, res: FitRes) -> None:  # phase 0: public keys
        self.pk[res.client_id] = (_bytes_array(res.arrays, "c_pk", 32), _bytes_array(res.arrays, "s_pk", 32))

    def lost(self, phase: int, client_id: str, reason: str) -> None:
        self.lost_at[client_id] = phase

    def next_exchange(self, accepted: list[str]) -> dict[str, FitIns] | None:
        self.phase += 1
        cfg = {"round": self.rnd, PHASE: self.phase}
        if self.phase == 1:
            u0 = sorted(self.pk)
            self.graph = neighbours(u0, self.s.neighbours, self.seed, self.rnd)
            self.t = threshold_for(self.s, min(len(v) for v in self.graph.values()))
            out = {}
            for i in u0:
                arrays = {f"{kind}/{j}": self.pk[j][n] for j in self.graph[i] for n, kind in enumerate(("c_pk", "s_pk"))}
                out[i] = FitIns(arrays, {**cfg, "threshold": self.t, "neighbours": self.graph[i]})
            return out
        if self.phase == 2:
            out = {}
            for i in sorted(self.u1):
                alive = [j for j in self.graph[i] if j in self.u1]
                out[i] = FitIns({f"ct/{j}": self.u1[j][f"ct/{i}"] for j in alive}, {**cfg, "alive": alive})
            return out
        if self.phase == 3:
            dropped = [j for j in self.u1 if j not in self.u2]
            out = {}
            for i in self.u2:
                surv = [j for j in self.graph[i] if j in self.u2]
                gone = [j for j in self.graph[i] if j in dropped]
                out[i] = FitIns({"nothing": np.zeros(1, np.uint8)}, {**cfg, "survivors": surv, "dropped": gone})
            return out
        return None

    def add_reply(self, phase: int, res: FitRes) -> None:
        cid = res.client_id
        if phase == 1:
            want = sorted(f"ct/{j}" for j in self.graph.get(cid, []))
            if sorted(res.arrays) != want:
                raise UpdateRejected(f"secure aggregation: share message keys {sorted(res.arrays)[:3]}..., expected {want[:3]}...")
            for k in want:
                _bytes_array(res.arrays, k)
            self.u1[cid] = res.arrays
        elif phase == 2:
            masked = res.arrays.get("masked")
            n = sum(v.size for v in self.layout.values()) + 1
            if sorted(res.arrays) != ["masked"] or masked.dtype != np.uint64 or masked.shape != (n,):
                raise UpdateRejected(f"secure aggregation: a masked input is uint64[{n}] under 'masked'")
            self.total = masked.copy() if self.total is None else self.total + masked
            self.u2.append(cid)
        elif phase == 3:
            for key, v in res.arrays.items():
                if key == "nothing":
                    continue
                kind, _, owner = key.partition("/")
                size = {"b": 1 + X.SEED_BYTES, "s": 1 + 2 * X.SEED_BYTES}.get(kind)
                if size is None or owner not in self.graph.get(cid, []):
                    raise UpdateRejected(f"secure aggregation: unexpected unmasking entry '{key}'")
                raw = bytes(_bytes_array(res.arrays, key, size))
                self.shares.setdefault((kind, owner), []).append((raw[0], raw[1:]))
        else:
            raise UpdateRejected(f"secure aggregation: no phase {phase}")

    def _secret(self, kind: str, owner: str) -> bytes:
        got = self.shares.get((kind, owner), [])
        if len(got) < self.t:
            raise SecAggFailed(f"round {self.rnd}: secure aggregation cannot remove {owner}'s "
                               f"{'self-mask' if kind == 'b' else 'pairwise masks'}: {len(got)} share(s) arrived, "
                               f"{self.t} needed (too many clients dropped: {sorted(self.lost_at)}); the run stops "
                               "here and resumes from the last checkpoint")
        if kind == "b":
            return X.combine_shares(got[: self.t])
        lo = X.combine_shares([(i, s[:X.SEED_BYTES]) for i, s in got[: self.t]])
        hi = X.combine_shares([(i, s[X.SEED_BYTES:]) for i, s in got[: self.t]])
        return lo + hi

    def result(self) -> tuple[Arrays, dict]:
        if self.total is None or not self.u2:
            raise SecAggFailed(f"round {self.rnd}: no masked input arrived")
        total = self.total.copy()
        n = total.size
        for j in self.u2:  # remove every survivor's self-mask
            total -= X.prg(self._secret("b", j), n)
        for j in [c for c in self.u1 if c not in self.u2]:  # and the pairwise masks the dropped left behind
            sk = X.private_from_bytes(self._secret("s", j))
            for i in self.graph[j]:
                if i in self.u2:
                    mask = X.prg(X.agree(sk, self.pk[i][1], mask_info(self.rnd, i, j)), n)
                    total = total - mask if sign(i, j) > 0 else total + mask  # what i added for j
        vec = X.decode(total)
        weight = vec[-1]
        if weight <= 0:
            raise SecAggFailed(f"round {self.rnd}: the unmasked weights sum to {weight}")
        sums, i = {}, 0
        for k in sorted(self.layout):
            size = self.layout[k].size
            sums[k] = vec[i:i + size].reshape(self.layout[k].shape)
            i += size
        info = {"secagg": {"survivors": len(self.u2), "dropped_after_sharing": len(self.u1) - len(self.u2),
                           "threshold": self.t, "neighbours": min(len(v) for v in self.graph.values()),
                           "weight_sum": float(weight)}}
        if self.finish is not None:
            out, metrics = self.finish(sums, float(weight), len(self.u2))
            return out, {**metrics, **info}
        mean = {k: (sums[k] / weight).astype(self.g[k].dtype) for k in self.g}
        return self.strategy.server_step(self.g, mean), info


def mask_info(rnd: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"fedtune-secagg mask|{rnd}|{lo}|{hi}".encode()

"""FedIT server step: FedAvg of LoRA adapters weighted by example counts, optionally
followed by a server optimizer (FedAvgM, FedAdagrad, FedAdam, FedYogi, FedExP's extrapolation:
core/fedopt.py) on the averaged update, or a robust rule (coordinate-wise median, trimmed mean, Krum, Multi-Krum,
Bulyan: core/robust.py) in place of the mean. With clip_norm,
each client's update is first clipped to that L2 distance from the global arrays."""

from __future__ import annotations

import logging

import numpy as np

from fedtune.core import fedopt
from fedtune.core.aggregate import RunningMean
from fedtune.core.lora_math import ProductMean, empty_stack, rank_of, split_stack, stack, truncate, zero_pad
from fedtune.core.seeds import derive_seed
from fedtune.core.dp_client import round_config
from fedtune.core.dp_fold import DistributedDPFinish, DPMeanFold, update_keys
from fedtune.core.privacy import DPLedger, DPSettings
from fedtune.core.secagg import PHASE, SecAggFold, SecAggSettings
from fedtune.core.arrays import Arrays, copy
from fedtune.core.robust import bulyan, clip_to_norm, coordinate_median, multi_krum, trimmed_count, trimmed_mean
from fedtune.core.strategy import CollectingAggregator, FitIns, FitRes, OneExchange, SelectingStrategy
from fedtune.errors import UpdateRejected
from fedtune.fedit.scaffold import ScaffoldFold, with_variates

log = logging.getLogger("fedtune.strategy")

ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")
AGGREGATIONS = fedopt.RULES + (fedopt.FEDEXP,) + ROBUST + ("scaffold",)


class FedAvgStrategy(SelectingStrategy):
    def __init__(self, initial: Arrays, *, seed: int, fraction: float = 1.0, clients_per_round: int = 0,
                 aggregation: str = "fedavg", server_lr: float = 1.0, momentum: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, max_update_norm: float = 0.0,
                 clip_norm: float = 0.0, trim_fraction: float = 0.1, byzantine: int = 1, krum_select: int = 0,
                 lora_aggregation: str = "separate", lora_rank: int = 0, train_config: dict | None = None,
                 dp: DPSettings | None = None, secagg: SecAggSettings | None = None, trainable=None,
                 client_ranks: list[int] | None = None, fedexp_epsilon: float = 1e-3):
        super().__init__(seed, fraction, clients_per_round, max_update_norm)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        if clip_norm < 0 or not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"need clip_norm >= 0 and 0 <= trim_fraction < 0.5, got {clip_norm}, {trim_fraction}")
        self.clip_norm, self.trim_fraction = clip_norm, trim_fraction
        self.byzantine, self.krum_select = byzantine, krum_select
        if lora_aggregation not in ("separate", "svd", "stack") or (lora_aggregation != "separate"
                                                                    and aggregation != "fedavg"):
            raise ValueError(f"lora_aggregation {lora_aggregation!r} with aggregation {aggregation!r}")
        if lora_aggregation == "stack" and clip_norm > 0:
            raise ValueError("lora_aggregation 'stack' (FLoRA) does not clip: set clip_norm = 0")
        self.lora_aggregation, self.lora_rank = lora_aggregation, lora_rank
        if dp is not None and (aggregation not in fedopt.RULES or lora_aggregation != "separate"):
            raise ValueError(f"client-level DP goes with the mean rules, not {aggregation!r} / {lora_aggregation!r}")
        self.dp = DPLedger(dp)
        self.trainable = trainable  # which arrays are updates under DP (None: all; FFA-LoRA: the B factors)
        central = dp is not None and dp.mode == "central"
        if secagg is not None and (aggregation not in fedopt.RULES or lora_aggregation != "separate" or central):
            raise ValueError("secure aggregation goes with the mean rules and without central DP")
        if dp is not None and dp.mode == "distributed" and secagg is None:
            raise ValueError("distributed DP needs secure aggregation")
        self.secagg = secagg
        self.client_ranks = list(client_ranks or [])  # heterogeneous LoRA ranks (HetLoRA / FlexLoRA)
        if self.client_ranks and (aggregation not in fedopt.RULES or dp is not None or secagg is not None):
            raise ValueError("heterogeneous LoRA ranks go with the mean rules, without DP or secure aggregation")
        self._initial = copy(split_stack(initial)[0])  # FLARE's job file holds initial_arrays(), stack included
        self.aggregation = aggregation
        self.server_lr, self.momentum, self.beta2, self.tau = server_lr, momentum, beta2, tau
        self.fedexp_epsilon = fedexp_epsilon
        self.train_config = dict(train_config or {})
        self.c: Arrays = {}  # SCAFFOLD's server control variate
        self.num_clients = 0
        self.m: Arrays = {}  # first moment / momentum buffer (fedavgm, fedadam)
        self.v: Arrays = {}  # second moment (fedadam)
        self.steps = 0

    def initial_arrays(self) -> Arrays:
        if self.lora_aggregation == "stack":  # FLoRA: the adapter clients start from, and a rank-0 stack
            return {**copy(self._initial), **empty_stack(self._initial)}
        return copy(self._initial)

    def fresh_adapter(self, rnd: int) -> Arrays:
        """FLoRA: the adapter every client starts round `rnd` from: the run's initial adapter in
        round 1, then PEFT's init drawn anew each round (B = 0: the stack alone is the model)."""
        from fedtune.fedit.lora import init_adapter

        if rnd <= 1:
            return copy(self._initial)
        return init_adapter({k: v.shape for k, v in self._initial.items()}, derive_seed(self.seed, rnd, 0, 7))

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]:
        selected = self.select(rnd, client_ids)
        extra = {PHASE: 0} if self.secagg is not None else {}
        if self.dp:  # the ledger knows N and m once the clients are known; no round past the budget
            acc = self.dp.start_round(rnd, len(client_ids), len(selected))
            if acc.s.mode == "distributed":
                extra.update(round_config(acc))
        arrays = global_arrays
        if self.aggregation == "scaffold":  # the server control variate travels with the adapter
            self.num_clients = len(client_ids)
            if not self.c:
                self.c = {k: np.zeros_like(v) for k, v in global_arrays.items()}
            arrays = with_variates(global_arrays, self.c)
        cfg = {"round": rnd, **extra, **self.train_config}
        stacked = {}
        if self.lora_aggregation == "stack":  # FLoRA: a fresh adapter, and the stack of every earlier round
            stacked = {k: v for k, v in global_arrays.items() if k not in self._initial}
            arrays = self.fresh_adapter(rnd)
        if self.client_ranks:  # each client gets the first r_i components of the global adapter
            return {cid: FitIns({**truncate(arrays, rank_of(cid, client_ids, self.client_ranks)), **stacked},
                                dict(cfg)) for cid in selected}
        return {cid: FitIns({**arrays, **stacked}, dict(cfg)) for cid in selected}

    def check_reply(self, ins: FitIns, res: FitRes) -> None:
        if self.lora_aggregation == "stack":  # the reply is the trained adapter, without the stack
            return super().check_reply(FitIns(split_stack(ins.arrays)[0], ins.config), res)
        if self.secagg is None:
            return super().check_reply(ins, res)
        if sorted(res.arrays) != ["c_pk", "s_pk"] or any(v.dtype != np.uint8 or v.shape != (32,)
                                                          for v in res.arrays.values()):
            raise UpdateRejected("secure aggregation: the first reply is two X25519 public keys, uint8[32] "
                                 "under 'c_pk' and 's_pk'")

    def aggregator(self, rnd: int, global_arrays: Arrays):
        """Rules that need only a running weighted sum (fedavg, fedavgm, fedadam) take client
        results one at a time, so the server holds one sum instead of every client's adapter;
        the robust rules need all updates at once."""
        keys = update_keys(global_arrays, self.trainable)
        if self.secagg is not None and self.dp:
            finish = DistributedDPFinish(self, global_arrays, self.dp.accounting, rnd, keys)
            return SecAggFold(self, global_arrays, rnd, self.secagg, self.seed, finish.layout(), finish)
        if self.secagg is not None:
            return SecAggFold(self, global_arrays, rnd, self.secagg, self.seed)
        if self.dp:
            return DPMeanFold(self, global_arrays, self.dp.accounting, rnd, self.dp.rng, keys)
        if self.aggregation in ROBUST:
            return CollectingAggregator(self, rnd, global_arrays)
        if self.aggregation == "scaffold":
            return _ScaffoldRound(self, global_arrays)
        if self.lora_aggregation == "svd":
            return ProductFold(self, global_arrays)
        if self.lora_aggregation == "stack":
            return StackFold(global_arrays)
        return MeanFold(self, global_arrays)

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        if self.aggregation not in ROBUST or self.lora_aggregation == "svd":  # the same arithmetic as folding
            fold = self.aggregator(rnd, global_arrays)
            for r in results:
                fold.add(r)
            return fold.result()
        updates = [r.arrays for r in results]
        metrics: dict = {}
        if self.clip_norm > 0:  # before any rule: no single update moves the global farther than clip_norm
            clipped = [clip_to_norm(global_arrays, u, self.clip_norm) for u in updates]
            updates = [u for u, _ in clipped]
            metrics["clipped"] = [r.client_id for r, (_, norm) in zip(results, clipped) if norm > self.clip_norm]
        if self.aggregation == "median":
            return coordinate_median(updates), metrics
        if self.aggregation in ("krum", "multi_krum", "bulyan"):
            f = self.byzantine
            if self.aggregation == "bulyan":
                agg, picked = bulyan(updates, f)
            else:
                m = 1 if self.aggregation == "krum" else (self.krum_select or len(updates) - f)
                agg, picked = multi_krum(updates, f, min(m, len(updates)))
            metrics["selected"] = [results[i].client_id for i in picked]
            return agg, metrics
        cut = trimmed_count(len(updates), self.trim_fraction)
        metrics["trimmed_per_side"] = cut
        if cut == 0:
            log.warning("round %d: trimmed_mean over %d update(s) with server.trim_fraction = %g trims nothing "
                        "(floor(%g x %d) = 0): this round is a plain unweighted mean", rnd, len(updates),
                        self.trim_fraction, self.trim_fraction, len(updates))
        return trimmed_mean(updates, self.trim_fraction), metrics

    def padded(self, update: Arrays, global_arrays: Arrays) -> Arrays:
        """A lower-rank client's reply zero-padded to the global rank (heterogeneous ranks only)."""
        return zero_pad(update, global_arrays) if self.client_ranks else update

    def server_step(self, global_arrays: Arrays, avg: Arrays) -> Arrays:
        """The next global arrays from the mean of the updates (FedOpt's server optimizer)."""
        if self.aggregation not in fedopt.RULES or self.aggregation == "fedavg":
            return avg
        self.steps += 1
        out, self.m, self.v = fedopt.step(self.aggregation, global_arrays, avg, self.m, self.v, lr=self.server_lr,
                                          beta1=self.momentum, beta2=self.beta2, tau=self.tau)
        return out

    def state(self) -> tuple[Arrays, dict]:
        arrays = {f"m/{k}": np.asarray(v) for k, v in self.m.items()}
        arrays.update({f"v/{k}": np.asarray(v) for k, v in self.v.items()})
        arrays.update({f"c/{k}": np.asarray(v) for k, v in self.c.items()})
        return arrays, {"steps": self.steps, **self.dp.state()}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        self.m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}
        self.c = {k[2:]: v for k, v in arrays.items() if k.startswith("c/")}
        self.steps = int(meta.get("steps", 0))
        self.dp.load_state(meta)


class MeanFold(OneExchange):
    """One round's mean-based aggregation, fed one client result at a time: clip (when
    clip_norm is set), add to the running weighted sum, and at the end the server step.
    FedExP also folds in each update's weighted squared norm (one float per round)."""

    def __init__(self, strategy: FedAvgStrategy, global_arrays: Arrays):
        self.strategy = strategy
        self.global_arrays = global_arrays
        self.mean = RunningMean()
        self.clipped: list[str] = []
        self.sq_sum = 0.0  # FedExP: Σ n_i ||Δ_i||²

    def add(self, res: FitRes) -> None:
        update, clip = self.strategy.padded(res.arrays, self.global_arrays), self.strategy.clip_norm  # HetLoRA
        if clip > 0:  # before the mean: no single update moves the global farther than clip_norm
            update, norm = clip_to_norm(self.global_arrays, update, clip)
            if norm > clip:
                self.clipped.append(res.client_id)
        self.mean.add(update, res.num_examples)
        if self.strategy.aggregation == fedopt.FEDEXP:
            self.sq_sum += res.num_examples * fedopt.squared_distance(self.global_arrays, update)

    def result(self) -> tuple[Arrays, dict]:
        metrics = {"clipped": self.clipped} if self.strategy.clip_norm > 0 else {}
        if self.strategy.aggregation == fedopt.FEDEXP:
            self.strategy.steps += 1
            out, eta, ratio = fedopt.fedexp_step(self.global_arrays, self.mean.result(),
                                                 self.sq_sum / self.mean.total, self.strategy.fedexp_epsilon)
            return out, {**metrics, "server_lr": eta, "fedexp_ratio": ratio}
        return self.strategy.server_step(self.global_arrays, self.mean.result()), metrics


class _ScaffoldRound(ScaffoldFold):
    """SCAFFOLD's server step, with clipping as the other mean rules, and c kept on the strategy."""

    def __init__(self, strategy: FedAvgStrategy, global_arrays: Arrays):
        super().__init__(global_arrays, strategy.c, strategy.num_clients, strategy.server_lr)
        self.strategy = strategy

    def result(self) -> tuple[Arrays, dict]:
        x, metrics = super().result()
        self.strategy.c = self.c_next
        self.strategy.steps += 1
        return x, metrics


class ProductFold(OneExchange):
    """FlexLoRA: the exact example-weighted mean of the clients' B A, re-factored to rank r."""

    def __init__(self, strategy: FedAvgStrategy, global_arrays: Arrays):
        self.strategy, self.global_arrays = strategy, global_arrays
        self.mean = ProductMean()
        self.clipped: list[str] = []

    def add(self, res: FitRes) -> None:
        update, clip = self.strategy.padded(res.arrays, self.global_arrays), self.strategy.clip_norm  # same B A
        if clip > 0:
            update, norm = clip_to_norm(self.global_arrays, update, clip)
            if norm > clip:
                self.clipped.append(res.client_id)
        self.mean.add(update, res.num_examples)

    def result(self) -> tuple[Arrays, dict]:
        rank = self.strategy.lora_rank or min(v.shape[0] for k, v in self.global_arrays.items() if ".lora_A." in k)
        out, metrics = self.mean.result(rank)
        if self.strategy.clip_norm > 0:
            metrics["clipped"] = self.clipped
        return out, metrics


class StackFold(OneExchange):
    """FLoRA: each client's adapter stacked onto the global stack with its example weight, so the
    global update grows by exactly the weighted mean of the clients' B A (core/lora_math.py)."""

    def __init__(self, global_arrays: Arrays):
        self.global_arrays = global_arrays
        self.replies: dict[str, FitRes] = {}

    def add(self, res: FitRes) -> None:
        self.replies[res.client_id] = res

    def result(self) -> tuple[Arrays, dict]:
        ordered = [self.replies[c] for c in sorted(self.replies)]  # by client id, not by arrival: same on every engine
        out = stack(self.global_arrays, [r.arrays for r in ordered], [float(r.num_examples) for r in ordered])
        rank = min(v.shape[0] for k, v in split_stack(out)[1].items() if ".lora_A." in k)
        return out, {"stack_rank": rank}

"""`report.md` for a run folder: the resolved config, the results table, and PNG plots.

Everything is read back from the files every run writes (`config.toml`, `metrics.jsonl`,
`summary.json`), so any algorithm's run folder gets a report, and `fedtune report RUN_DIR`
can rebuild one later. Plots (matplotlib, Agg backend, no display needed):

- `plots/global_metric.png`: each scalar held-out metric of the global model per round;
- `plots/client_train_loss.png`: each client's training loss in the rounds it took part in;
- `plots/communication.png`: bytes sent to and received from clients per round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedtune.core import atomic
from fedtune.errors import FedtuneError

# Scalar eval keys plotted per round, in this order when present; any other numeric key follows.
PREFERRED = ("accuracy", "macro_f1", "f1", "loss", "rouge_l", "exact_match", "judge_score")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
    return records


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FedtuneError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalar_keys(evals: list[dict]) -> list[str]:
    """Numeric metric keys, preferred ones first; row counts and a `*score` that only
    repeats another key (FedBPT's dev_score = dev_accuracy) are left out."""
    seen = []
    for ev in evals:
        for k, v in ev.items():
            if _is_num(v) and k not in seen and not k.endswith("rows"):
                seen.append(k)

    def repeats(k):
        return k.endswith("score") and any(o != k and all(ev.get(o) == ev.get(k) for ev in evals) for o in seen)

    seen = [k for k in seen if not repeats(k)]
    order = list(dict.fromkeys(k for p in PREFERRED for k in seen if k == p or k.endswith("_" + p)))
    return order + sorted(k for k in seen if k not in order)


def client_loss(c: dict) -> float | None:
    for k in ("train_loss", "loss"):
        if _is_num(c.get(k)):
            return float(c[k])
    return None


def fmt(v, key: str = "") -> str:
    if v is None:
        return "-"
    if not _is_num(v):
        return str(v)
    if any(t in key for t in ("exact_match", "accuracy", "rouge", "macro_f1", "win", "tie")):
        return f"{100 * v:.1f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_per_round(rows: list[tuple[int, dict]], keys: list[str], title: str, color: str, path: Path) -> bool:
    """One panel per key: its value in each round's dict (rows: [(round, {key: value})])."""
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(rnd, d[k]) for rnd, d in rows if _is_num(d.get(k))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color)
        ax.set_title(title.format(k))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_global_metric(records: list[dict], path: Path) -> bool:
    evals = [(r["round"], r["eval"]) for r in records if isinstance(r.get("eval"), dict)]
    keys = [k for k in scalar_keys([e for _, e in evals]) if not k.endswith("perplexity")]  # exp(loss): the same curve
    return _plot_per_round(evals, keys, "held-out {}", "C0", path)


def plot_client_loss(records: list[dict], path: Path) -> bool:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for c in r.get("clients", []):
            v = client_loss(c)
            if v is not None:
                series.setdefault(str(c.get("id")), []).append((r["round"], v))
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    many = len(series) > 12
    for cid, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=None if many else "o", lw=0.8 if many else 1.5,
                alpha=0.35 if many else 0.9, label=None if many else cid)
    rounds = sorted({rnd for pts in series.values() for rnd, _ in pts})
    mean = []
    for rnd in rounds:
        vals = [v for pts in series.values() for rr, v in pts if rr == rnd]
        mean.append(sum(vals) / len(vals))
    ax.plot(rounds, mean, color="black", lw=2.2, label="mean over clients")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss")
    ax.set_title(f"each client's training loss ({len(series)} clients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_communication(records: list[dict], path: Path) -> bool:
    rows = [(r["round"], r.get("bytes_down", 0), r.get("bytes_up", 0)) for r in records]
    if not rows or not any(d or u for _, d, u in rows):
        return False
    plt = _plt()
    peak = max(d + u for _, d, u in rows)
    unit, size = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if peak >= s), ("B", 1))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [r for r, _, _ in rows]
    down = [d / size for _, d, _ in rows]
    up = [u / size for _, _, u in rows]
    ax.bar(x, down, label="server -> clients", color="C0")
    ax.bar(x, up, bottom=down, label="clients -> server", color="C1")
    ax.set_xlabel("round")
    ax.set_ylabel(unit)
    ax.set_ylim(0, peak / size * 1.3)  # room for the legend above the bars
    total = sum(d + u for _, d, u in rows)
    ax.set_title(f"communication per round (total {fmt_bytes(total)})")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_server_metrics(records: list[dict], path: Path) -> bool:
    """The server step's own numbers per round (FedBPT: sigma, |z|; clipping counts...)."""
    aggs = [(r["round"], r.get("aggregate") or {}) for r in records]
    return _plot_per_round(aggs, scalar_keys([a for _, a in aggs])[:4], "server: {}", "C2", path)


# ----------------------------------------------------------------------------- tables


def prompt_table(summary: dict) -> str:
    """Runs that report prompts evaluated on dev and test (FedBPT: the zero prompt, the best
    by dev, the final round's): one row per prompt, dev and test metrics."""
    names = [("zero_prompt", "zero prompt"), ("best", "best by dev"), ("final", "final round")]
    entries = [(label, summary[k]) for k, label in names if isinstance(summary.get(k), dict)]
    metrics = scalar_keys([e.get(split) or {} for _, e in entries for split in ("dev", "test")])
    splits = [sp for sp in ("dev", "test") if any(isinstance(e.get(sp), dict) for _, e in entries)]
    header = ["prompt", "round"] + [f"{sp} {m}" for sp in splits for m in metrics]
    rows = [[label, str(e.get("round", 0))] + [fmt((e.get(sp) or {}).get(m), m) for sp in splits for m in metrics]
            for label, e in entries]
    return md_table(header, rows)


def results_table(summary: dict) -> str:
    """Per category (rows) x metric (columns), base vs final when the base was evaluated."""
    final = summary.get("final") or {}
    if isinstance(final.get("dev"), dict) or isinstance(final.get("test"), dict):
        return prompt_table(summary)
    base = summary.get("base") if isinstance(summary.get("base"), dict) else None
    sources = [("base", base), ("final", final)] if base else [("final", final)]
    by_cat = [k[: -len("_by_category")] for k, v in final.items() if k.endswith("_by_category") and isinstance(v, dict)]
    overall = [k for k in scalar_keys([final]) if not k.endswith("perplexity")]  # exp(loss): the same curve
    metrics = [k for k in overall if k in by_cat] + [k for k in by_cat if k not in overall]
    metrics += [k for k in overall if k not in metrics]
    if not metrics:
        return "_no held-out metrics in summary.json_"
    header = ["category"] + [f"{name} {m}" for m in metrics for name, _ in sources]
    cats = sorted({c for m in by_cat for src in (final, base or {}) for c in (src.get(f"{m}_by_category") or {})})
    rows = []
    for c in cats:
        rows.append([c] + [fmt((src or {}).get(f"{m}_by_category", {}).get(c), m) for m in metrics for _, src in sources])
    rows.append(["**all**"] + [fmt((src or {}).get(m), m) for m in metrics for _, src in sources])
    return md_table(header, rows)


def rounds_table(records: list[dict]) -> str:
    evals = [r["eval"] for r in records if isinstance(r.get("eval"), dict)]
    keys = [k for k in scalar_keys(evals) if not k.endswith("perplexity")]
    header = ["round", "clients", "dropped", "mean train loss"] + [f"held-out {k}" for k in keys] + \
        ["bytes down", "bytes up", "seconds"]
    rows = []
    for r in records:
        losses = [v for v in (client_loss(c) for c in r.get("clients", [])) if v is not None]
        ev = r.get("eval") or {}
        rows.append([str(r["round"]), str(len(r.get("clients", []))), str(len(r.get("dropped", []))),
                     fmt(sum(losses) / len(losses)) if losses else "-"] + [fmt(ev.get(k), k) for k in keys] +
                    [fmt_bytes(r.get("bytes_down", 0)), fmt_bytes(r.get("bytes_up", 0)),
                     f"{r['round_seconds']:.1f}" if _is_num(r.get("round_seconds")) else "-"])
    return md_table(header, rows)


# ----------------------------------------------------------------------------- the report


def write_report(run_dir: str | Path, summary: dict | None = None) -> Path:
    """Write run_dir/report.md (and run_dir/plots/*.png); returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedtuneError(f"{run_dir}: not a folder")
    summary = summary if summary is not None else _read_json(run_dir / "summary.json")
    records = read_metrics(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = {
        "global_metric": plot_global_metric(records, plots / "global_metric.png"),
        "client_train_loss": plot_client_loss(records, plots / "client_train_loss.png"),
        "communication": plot_communication(records, plots / "communication.png"),
        "server_metrics": plot_server_metrics(records, plots / "server_metrics.png"),
    }
    algo = (summary or {}).get("algorithm", "?")
    lines = [f"# Run report: {run_dir.name}", ""]
    if summary:
        lines.append(f"Algorithm **{algo}** · {summary.get('rounds', len(records))} rounds · "
                     f"{summary.get('seconds', '?')} s in all.")
    else:
        lines.append(f"_No summary.json: the run has not finished; {len(records)} round(s) recorded so far._")
    for statement in privacy_statements(summary or {}):
        lines += ["", statement]
    lines += ["", "## Results on the held-out set", ""]
    lines.append(results_table(summary) if summary else "_not available yet_")
    if summary and summary.get("client_sizes"):
        sizes = summary["client_sizes"]
        lines += ["", f"{len(sizes)} clients holding {min(sizes.values()):,} to {max(sizes.values()):,} "
                      f"training rows ({sum(sizes.values()):,} in all)."]
    lines += ["", "## Plots", ""]
    titles = {"global_metric": "Global model on the held-out set, per round",
              "client_train_loss": "Each client's training loss per round",
              "communication": "Communication per round",
              "server_metrics": "The server step's numbers per round"}
    for name, ok in made.items():
        if ok:
            lines += [f"### {titles[name]}", "", f"![{titles[name]}](plots/{name}.png)", ""]
        else:
            lines += [f"### {titles[name]}", "", "_no data for this plot in metrics.jsonl_", ""]
    others = sorted(p.name for p in plots.glob("*.png") if p.stem not in made)
    for name in others:  # plots a recipe drew itself (e.g. FedBPT's sigma and |z| per round)
        lines += [f"### {name}", "", f"![{name}](plots/{name})", ""]
    if records:
        total_b = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in records)
        lines += ["## Rounds", "", rounds_table(records), "",
                  f"Communication in all: {fmt_bytes(total_b)}.", ""]
        dropped = [(r["round"], d) for r in records for d in r.get("dropped", [])]
        if dropped:
            lines += ["Dropped client updates:", ""]
            lines += [f"- round {rnd}: {d.get('id')}: {d.get('reason')}" for rnd, d in dropped]
            lines.append("")
    cfg = run_dir / "config.toml"
    lines += ["## Resolved config", ""]
    if cfg.is_file():
        lines += ["<details><summary>config.toml</summary>", "", "```toml", cfg.read_text(encoding="utf-8").rstrip(),
                  "```", "", "</details>", ""]
    else:
        lines += ["_no config.toml in the run folder_", ""]
    out = run_dir / "report.md"
    atomic.write_text(out, "\n".join(lines))
    return out


def write_outputs(run_dir: str | Path, summary: dict) -> None:
    """A finished run's summary.json and report.md."""
    atomic.write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2))
    write_report(run_dir, summary)


# ----------------------------------------------------------------------------- the console


def privacy_statements(summary: dict) -> list[str]:
    """What the run can state about privacy, one sentence per guarantee."""
    out = []
    if (pv := summary.get("privacy")):
        clip = f"{'adaptive clip, last round at ' if 'next_clip' in pv else 'clip '}{pv['clip']:.4g}"
        out.append(f"Differential privacy ({pv['mode']}, client level): ε = {pv['epsilon']:.4g} at δ = {pv['delta']:g} "
                   f"spent over the run (noise multiplier {pv['noise_multiplier']:.4g}, {clip}, "
                   f"{pv['clients_per_round']} of {pv['clients']} clients per round; RDP accountant, dp-accounting). "
                   "Each round's ε is in metrics.jsonl (aggregate.dp).")
    if (ps := summary.get("privacy_sample_level")):
        out.append(f"Sample-level DP-SGD in local training: every client's rows at ε ≤ {ps['epsilon_max']:.4g}, "
                   f"δ = {ps['delta']:g} (noise multiplier {ps['noise_multiplier']:g}, up to {ps['steps_max']} "
                   "steps per client; RDP accountant, dp-accounting). Each round's is in metrics.jsonl (dpsgd).")
    return out

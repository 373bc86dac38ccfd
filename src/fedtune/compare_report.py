"""The tables, the markdown and the plot of `fedtune compare` (fedtune/compare.py runs it)."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.config import Config
from fedtune.reporting import fmt, md_table

METRICS = (("loss", "held-out loss (lower is better)"), ("rouge_l", "ROUGE-L"), ("exact_match", "exact match"))


def build_table(results: dict[str, dict], categories: list[str]) -> dict:
    """{metric: {variant: {category or 'all': value}}}, plus the mean over local-only clients."""
    cats = sorted(set(categories))
    table: dict[str, dict] = {}
    for key, _ in METRICS:
        rows = {}
        for name, res in results.items():
            ev = res.get("final", {})
            if key not in ev:
                continue
            row = {c: ev.get(f"{key}_by_category", {}).get(c) for c in cats}
            row["all"] = ev[key]
            rows[name] = row
        local = [n for n in rows if n.startswith("local ")]
        if len(local) > 1:
            mean_row = {}
            for c in cats + ["all"]:
                vals = [rows[n][c] for n in local if rows[n][c] is not None]
                mean_row[c] = sum(vals) / len(vals) if vals else None
            # keep the order: base, each local, local mean, centralized, federated
            ordered = {}
            for n, r in rows.items():
                ordered[n] = r
                if n == local[-1]:
                    ordered["local (mean)"] = mean_row
            rows = ordered
        if rows:
            table[key] = rows
    return table


def print_table(doc: dict, console) -> None:
    from rich.table import Table

    for key, title in METRICS:
        rows = doc["table"].get(key)
        if not rows:
            continue
        cats = [c for c in next(iter(rows.values())) if c != "all"]
        t = Table(title=f"{title} on {doc['held_out_rows']} held-out rows")
        t.add_column("variant", no_wrap=True)
        for c in cats:
            t.add_column(c, justify="right", overflow="fold")
        t.add_column("all", justify="right", style="bold")
        for name, row in rows.items():
            t.add_row(name, *[fmt(row[c], key) for c in cats], fmt(row["all"], key))
        # a pipe or a file has no width of its own: print the whole table rather than fold it
        wide = 24 + 10 * (len(cats) + 1) + max(len(c) for c in cats + ["all"])
        if console.is_terminal or console.width >= wide:
            console.print(t)
        else:
            from rich.console import Console

            Console(width=wide, highlight=False, file=console.file).print(t)
    b = doc["budget"]
    console.print(f"budget per trained variant: {b['optimizer_steps']} optimizer steps x {b['batch_size']} examples "
                  f"= {b['examples']} examples, over {b['rounds']} rounds")
    if doc.get("judge"):
        console.print(f"judge: {json.dumps(doc['judge'].get('scores'))}")


def compare_markdown(cfg: Config, doc: dict, out: Path) -> str:
    b = doc["budget"]
    lines = ["# fedtune compare", "",
             f"Model `{cfg.model.name}` · data `{cfg.data.path}` · {len(doc['clients'])} clients "
             f"({cfg.partition.method}) · {doc['held_out_rows']} held-out rows (never trained on) · "
             f"{doc['seconds']:.0f} s in all.", "",
             f"Equal budget: every trained variant takes {b['optimizer_steps']} optimizer steps of {b['batch_size']} "
             f"examples ({b['examples']} examples) over {b['rounds']} rounds (per round: {b['steps_by_round']}).", ""]
    for key, title in METRICS:
        rows = doc["table"].get(key)
        if not rows:
            continue
        cats = [c for c in next(iter(rows.values())) if c != "all"]
        lines += [f"## {title}", "", md_table(["variant"] + cats + ["**all**"],
                                                [[n] + [fmt(r[c], key) for c in cats] + [f"**{fmt(r['all'], key)}**"]
                                                 for n, r in rows.items()]), ""]
    lines += ["## Budget actually used", "",
              md_table(["variant", "optimizer steps", "examples", "tokens", "train s"],
                       [[n, fmt(v["budget"].get("optimizer_steps")), fmt(v["budget"].get("examples")),
                         fmt(v["budget"].get("tokens")), fmt(v["budget"].get("train_seconds"))]
                        for n, v in doc["variants"].items()]), ""]
    if doc.get("judge"):
        j = doc["judge"]
        lines += [f"## LLM judge ({j['model']}, {j['questions']} questions)", "",
                  md_table(["variant", "mean score (1-10)", "scored", "unparsed"],
                           [[n, fmt(s["judge_score"]), str(s["judge_scored"]), str(s["judge_errors"])]
                            for n, s in j["scores"].items()]), ""]
        if j.get("pairwise"):
            lines += ["Pairwise, federated against each variant (both orders; a verdict that flips is a tie):", "",
                      md_table(["federated vs", "win", "tie", "loss", "judged", "errors"],
                               [[n, fmt(p["win"], "win"), fmt(p["tie"], "tie"), fmt(p["loss"], "win"),
                                 str(p["judged"]), str(p["errors"])] for n, p in j["pairwise"].items()]), ""]
    lines += ["Each trained variant's run folder (report.md with plots, metrics.jsonl, adapter/): " +
              ", ".join(f"[{n}]({_folder(n)}/report.md)" for n in doc["variants"] if n != "base"), ""]
    plot = plot_variants(doc, out)
    if plot:
        lines += ["## Held-out loss per round, every variant", "", f"![held-out loss per round]({plot})", ""]
    return "\n".join(lines)


def _folder(name: str) -> str:
    """A variant's folder: 'local client_000' -> local_client_000, 'federated fedavgm' -> federated_fedavgm."""
    return name.replace(" ", "_", 1)


def plot_variants(doc: dict, out: Path) -> str | None:
    from fedtune.reporting import _plt, read_metrics

    curves = {}
    for name in doc["variants"]:
        if name == "base":
            continue
        recs = read_metrics(out / _folder(name))
        pts = [(r["round"], r["eval"]["loss"]) for r in recs if "loss" in r.get("eval", {})]
        if pts:
            curves[name] = pts
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        local = name.startswith("local ")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9 if local else 2.2, alpha=0.5 if local else 1,
                color="grey" if local else None, label=None if local else name, marker=None if local else "o")
    base = doc["variants"].get("base", {}).get("final", {}).get("loss")
    if base is not None:
        ax.axhline(base, color="black", ls="--", lw=1, label="base (untuned)")
    if any(n.startswith("local ") for n in curves):
        ax.plot([], [], color="grey", label="local-only (each client)")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / "compare_loss.png", dpi=110)
    plt.close(fig)
    return "plots/compare_loss.png"

"""The end-of-run summary on the console (rich tables): held-out results per category, base
vs tuned; FedBPT's zero / best-by-dev / final prompts; what the run can state about privacy."""

from __future__ import annotations

from fedtune.reporting import privacy_statements


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    final, base = summary.get("final", {}), summary.get("base")
    if summary.get("algorithm") == "fedit":
        cats = sorted(set(final.get("loss_by_category", {})) | set(final.get("exact_match_by_category", {})))
        has_em = "exact_match" in final
        table = Table(title=f"Held-out results after {summary['rounds']} rounds")
        table.add_column("category")
        if base is not None:
            if has_em:
                table.add_column("base EM", justify="right")
            table.add_column("base loss", justify="right")
        if has_em:
            table.add_column("federated EM", justify="right")
        table.add_column("federated loss", justify="right")

        def row(name, key_em, key_loss, get):
            cells = [name]
            if base is not None:
                if has_em:
                    cells.append(_fmt(get(base, key_em), pct=True))
                cells.append(_fmt(get(base, key_loss)))
            if has_em:
                cells.append(_fmt(get(final, key_em), pct=True))
            cells.append(_fmt(get(final, key_loss)))
            table.add_row(*cells)

        for c in cats if len(cats) > 1 else ():  # one category: the "all" row says it (no copy of it)
            row(c, "exact_match_by_category", "loss_by_category", lambda d, k: d.get(k, {}).get(c))
        row("[bold]all[/]", "exact_match", "loss", lambda d, k: d.get(k))
        console.print(table)
    if summary.get("algorithm") == "fedbpt":
        _print_fedbpt(summary, console)
    for statement in privacy_statements(summary):
        console.print(statement)
    console.print(f"total time {summary.get('seconds', 0):.0f}s")


def _print_fedbpt(summary: dict, console) -> None:
    """Zero prompt vs best-by-dev vs final-round prompt, dev and test, and bytes on the wire."""
    from rich.table import Table

    metric = summary.get("metric", "accuracy")
    table = Table(title=f"FedBPT ({summary.get('mode')}) on {summary.get('task')}: {metric}, "
                        f"{summary['rounds']} rounds (saved prompt: {summary.get('selected')})")
    keys = ("zero_prompt", "best", "final")
    other = "accuracy" if metric == "f1" else "f1"  # a pair task reports both (MRPC: F1 first; RTE: accuracy)
    other = other if any(other in ((summary.get(k) or {}).get("test") or {}) for k in keys) else ""
    cols = ("prompt", "round", f"dev {metric}", "dev loss", f"test {metric}") + ((f"test {other}",) if other else ())
    for col in cols + ("test loss",):
        table.add_column(col, justify="left" if col == "prompt" else "right")
    for name, key in zip(("zero prompt", "best by dev", "final round"), keys):
        r = summary.get(key) or {}
        dev, test = r.get("dev") or {}, r.get("test") or {}
        cells = [name, str(r.get("round", 0)), _fmt(dev.get("score"), pct=True), _fmt(dev.get("loss")),
                 _fmt(test.get("score"), pct=True)] + ([_fmt(test.get(other), pct=True)] if other else [])
        table.add_row(*cells, _fmt(test.get("loss")))
    console.print(table)
    comm = summary.get("communication") or {}
    if comm:
        console.print(f"bytes per client per round: down {comm['bytes_down_per_client_round_max']:,}, "
                      f"up {comm['bytes_up_per_client_round_max']:,} (max over the run)")

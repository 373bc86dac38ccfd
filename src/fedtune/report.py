"""Printing results: the end-of-run table (base vs federated, per category)."""

from __future__ import annotations


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

        for c in cats:
            row(c, "exact_match_by_category", "loss_by_category", lambda d, k: d.get(k, {}).get(c))
        row("[bold]all[/]", "exact_match", "loss", lambda d, k: d.get(k))
        console.print(table)
    console.print(f"total time {summary.get('seconds', 0):.0f}s")

"""Human-readable table and JSON output of an evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (("ndcg@10", "NDCG@10"), ("recall@10", "Recall@10"), ("mrr", "MRR"), ("auc", "AUC"),
           ("coverage@10", "Cov@10"), ("exposure_entropy@10", "Entropy@10"), ("consumed@10", "Seen@10"))


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(report: dict[str, Any]) -> str:
    """Metrics per candidate source and order; the NDCG gain with its 95% paired bootstrap interval
    over users (how much of the gain is which users happened to be evaluated). Seen@10 is the share
    of the top 10 that the user already consumed (in the history the server was given)."""
    lines = [f"model: {report.get('server', {}).get('model_version', '?')}   users: {report['config']['users']}"]
    header = (
        f"{'candidates':<18} {'order':<9} " + " ".join(f"{title:>10}" for _, title in COLUMNS)
        + f" {'NDCG gain':>10}  95% CI"
    )
    lines += [header, "-" * len(header)]
    for name, result in report["results"].items():
        up, rr = result["upstream"], result["reranked"]
        for order, metrics in (("upstream", up), ("reranked", rr)):
            row = f"{name:<18} {order:<9} " + " ".join(f"{_fmt(metrics.get(key)):>10}" for key, _ in COLUMNS)
            if order == "reranked" and up["ndcg@10"] > 0:
                row += f" {100 * (rr['ndcg@10'] / up['ndcg@10'] - 1):>+9.1f}%"
                ci = (result.get("ndcg_ratio") or {}).get("ci95")
                if ci:
                    low, high = ("inf" if b is None else f"{100 * (b - 1):+.1f}%" for b in ci)
                    row += f"  [{low}, {high}]"
            lines.append(row)
    lines.append("")
    lines.append(f"{'candidates':<18} {'Rerank RPC latency ms':<24} p50      p90      p99      max   variants")
    for name, result in report["results"].items():
        lat = result["latency_ms"]
        variants = ", ".join(f"{k.removeprefix('VARIANT_').lower()}={v}" for k, v in sorted(result["variants"].items()))
        lines.append(
            f"{name:<18} {'':<24}" + " ".join(f"{lat.get(q, 0):8.2f}" for q in ("p50", "p90", "p99", "max")) + f"   {variants}"
        )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""Optional PNG plot of an evaluation report (needs matplotlib: `pip install 'reranker[plot]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(report: dict[str, Any], path: Path, metric: str = "ndcg@10") -> None:
    """Bars of `metric` per candidate set (retriever and candidate count), upstream vs reranked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the PNG plot needs matplotlib: pip install 'reranker[plot]' (or matplotlib)") from None
    names = list(report["results"])
    upstream = [report["results"][n]["upstream"][metric] for n in names]
    reranked = [report["results"][n]["reranked"][metric] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], upstream, width=0.4, label="upstream")
    ax.bar([x + 0.2 for x in xs], reranked, width=0.4, label="reranked")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by retriever and candidate count\n{report.get('server', {}).get('model_version', '')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

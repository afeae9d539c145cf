"""Optional PNG plot of an evaluation report (needs matplotlib: `pip install 'reranker[plot]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(report: dict[str, Any], path: Path, metric: str = "ndcg@10") -> None:
    """Bars of `metric` per candidate set (retriever and candidate count), upstream vs reranked,
    with 95% error bars (±1.96 standard errors) where the report has `<metric>_se`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the PNG plot needs matplotlib: pip install 'reranker[plot]' (or matplotlib)") from None
    names = list(report["results"])
    upstream = [report["results"][n]["upstream"][metric] for n in names]
    reranked = [report["results"][n]["reranked"][metric] for n in names]

    def errors(order: str) -> list[float] | None:
        values = [report["results"][n][order].get(f"{metric}_se") for n in names]
        return None if any(v is None for v in values) else [1.96 * v for v in values]

    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], upstream, width=0.4, label="upstream", yerr=errors("upstream"), capsize=3)
    ax.bar([x + 0.2 for x in xs], reranked, width=0.4, label="reranked", yerr=errors("reranked"), capsize=3)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel(metric)
    bars = " (error bars: ±1.96 s.e. of each mean)" if errors("upstream") else ""
    model = report.get("server", {}).get("model_version", "")
    ax.set_title(f"{metric} by retriever and candidate count{bars}\n{model}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

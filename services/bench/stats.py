"""Figures a benchmark part reports, and the percentile arithmetic behind them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a latency that happened)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Figures:
    rate: float | None = None  # per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    count: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

"""Small helpers shared by the package, tests and benchmarks (no dependency on the rest of the package)."""
from .memory import measure_peak

__all__ = ["measure_peak"]

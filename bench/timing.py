"""Timing: every function called in turn (round robin), latency percentiles and throughput."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_round_robin(fns: dict, warmup: int, iterations: int, max_seconds: float
                     ) -> tuple[dict, dict]:
    """Latencies (s) per key, calling the functions in turn: round r calls every function once.

    Interleaving makes every model/backend of one report see the same machine load (other
    processes share this CPU), so their ratios are fair even when the load drifts. ``warmup``
    rounds first (a function whose first warm-up call exceeds a quarter of its budget skips the
    rest: it has absorbed the one-off costs), then up to ``iterations`` rounds or until
    ``max_seconds`` per function are spent (at least one round). Returns (latencies, errors).
    """
    fns = dict(fns)
    errors: dict = {}

    def call(key) -> float | None:
        start = time.perf_counter()
        try:
            fns[key]()
        except Exception as exc:   # one broken backend must not end the others' timing
            errors[key] = f"{type(exc).__name__}: {exc}"
            del fns[key]
            return None
        return time.perf_counter() - start

    warm = set()
    for _ in range(warmup):
        for key in [k for k in fns if k not in warm]:
            seconds = call(key)
            if seconds is not None and seconds > max_seconds / 4:
                warm.add(key)
    latencies: dict = {key: [] for key in fns}
    budget = max_seconds * max(1, len(fns))
    start = time.perf_counter()
    rounds = 0
    while fns and rounds < max(1, iterations):
        for key in list(fns):
            seconds = call(key)
            if seconds is not None:
                latencies[key].append(seconds)
        rounds += 1
        if time.perf_counter() - start > budget:
            break
    return {k: v for k, v in latencies.items() if k not in errors}, errors


def time_calls(fn: Callable[[], object], warmup: int, iterations: int,
               max_seconds: float) -> list[float]:
    """Latencies of one function (see ``time_round_robin``)."""
    latencies, errors = time_round_robin({0: fn}, warmup, iterations, max_seconds)
    if errors:
        raise RuntimeError(errors[0])
    return latencies[0]


def summarize(latencies: list[float], batch: int) -> dict:
    ms = np.asarray(latencies) * 1000.0
    return {"iterations": len(latencies),
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                           "mean": float(ms.mean()), "min": float(ms.min())},
            "throughput_fps": float(batch * len(ms) / (ms.sum() / 1000.0))}

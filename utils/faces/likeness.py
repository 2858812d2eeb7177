"""Best-of-N: which candidates to keep, and the table the job JSON shows (pure functions).

A score is an ``identity_similarity`` in [0, 1] or None (no face found). Kept candidates are the
``keep`` highest scores, best first; a candidate without a face ranks below every scored one, and equal
scores keep generation order, so the result is deterministic.
"""
from __future__ import annotations

from typing import Sequence


def keep_best(scores: Sequence[float | None], keep: int) -> list[int]:
    """Indices of the ``keep`` best candidates, best first."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"keep={keep} must be between 1 and the {len(scores)} candidates")
    order = sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    return order[:keep]


def candidate_table(seeds: Sequence[int], scores: Sequence[float | None], kept: Sequence[int]) -> list[dict]:
    """One row per candidate in generation order: seed, score, kept, and the output it became."""
    where = {ci: rank for rank, ci in enumerate(kept, start=1)}
    return [{"candidate": i + 1, "seed": int(seed),
             "identity_similarity": None if score is None else round(float(score), 4),
             "kept": i in where, "output": where.get(i)}
            for i, (seed, score) in enumerate(zip(seeds, scores))]


def batches(total: int, per_call: int) -> list[tuple[int, int]]:
    """(offset, count) generation calls for ``total`` images, at most ``per_call`` each."""
    if total < 1 or per_call < 1:
        raise ValueError(f"total={total} and per_call={per_call} must be positive")
    return [(o, min(per_call, total - o)) for o in range(0, total, per_call)]

"""Consecutive items cut into runs of about equal bytes: a file's tensors among hashing threads
(digest.py), a node's tensors among the local executor's units (layout.py)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def equal_runs(items: list[T], nbytes: Callable[[T], int], count: int) -> list[list[T]]:
    """`items` in order, cut into at most `count` runs, each where the running total crosses its
    share: a run starts with the item whose middle lies past the runs so far. An item bigger than
    a share is a run alone; no run is empty (unless there are no items)."""
    sizes = [nbytes(item) for item in items]
    total = sum(sizes)
    runs: list[list[T]] = [[]]
    done = 0
    for item, n in zip(items, sizes):
        if runs[-1] and (done + n / 2) * count > len(runs) * total:
            runs.append([])
        runs[-1].append(item)
        done += n
    return runs

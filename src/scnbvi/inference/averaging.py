"""Polyak averaging of the variational parameters over each check window."""

from __future__ import annotations

import numpy as np


class IterateAverage:
    """Average of the variational parameters over the current check window.

    Minibatch noise makes the last iterate jitter around the optimum; the window average does
    not, so the ``elbo`` rule's checks and the returned fit use it (the ``parameters`` rule
    reproduces the original and keeps the last iterate). Parameters are an array or a dict
    of arrays.
    """

    def __init__(self):
        self.total, self.count, self.last_window = None, 0, None

    def add(self, params) -> None:
        self.add_sum(_map(np.copy, params), 1)

    def add_sum(self, total, count: int) -> None:
        """Add the sum of ``count`` iterates (an engine may sum them on its device)."""
        self.total = total if self.total is None else _map(lambda a, b: a + b, self.total, total)
        self.count += count

    def close_window(self):
        self.last_window = self._mean()
        self.total, self.count = None, 0
        return self.last_window

    def result(self, last_iterate):
        """The newest average (a partial window counts), else the last iterate."""
        if self.count:
            return self._mean()
        return self.last_window if self.last_window is not None else last_iterate

    def snapshot(self) -> dict:
        """Its state as host arrays, for a checkpoint (an engine may keep its sums on a device)."""
        def host(tree):
            return None if tree is None else _map(np.array, tree)

        return {"total": host(self.total), "count": self.count, "last_window": host(self.last_window)}

    def restore(self, snapshot: dict) -> None:
        self.total, self.count, self.last_window = snapshot["total"], snapshot["count"], snapshot["last_window"]

    def _mean(self):
        return _map(lambda total: total / self.count, self.total)


def _map(function, *trees):
    """``function`` applied leafwise to arrays or to dicts of arrays."""
    if isinstance(trees[0], dict):
        return {key: function(*(tree[key] for tree in trees)) for key in trees[0]}
    return function(*trees)

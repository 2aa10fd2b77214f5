"""A memory budget for the frames a worker holds in flight, so no input can make it grow.

Each frame reserves its cost (`lineguard.settings.frame_cost_bytes`, from the size in its JPEG header)
before it is decoded and gives it back when its outputs are acknowledged or it is dead-lettered. When
the budget is spent, the decode stage waits; its queue fills and the fetch stage stops fetching.

    >>> budget = MemoryBudget(1024 * 2**20)
    >>> await budget.acquire(300 * 2**20)       # returns at once; waits while the budget is spent
    >>> budget.release(300 * 2**20)
"""

from __future__ import annotations

import asyncio


class MemoryBudget:
    """A byte budget shared by the stages of one event loop (no await between check and take: no lock)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.in_use = 0
        self.peak = 0
        self._freed = asyncio.Event()

    def fits(self, nbytes: int) -> bool:
        return self.in_use + nbytes <= self.limit

    async def acquire(self, nbytes: int) -> None:
        if nbytes > self.limit:
            raise ValueError(f"a frame needing {nbytes} bytes can never fit a budget of {self.limit}")
        while not self.fits(nbytes):
            self._freed.clear()
            await self._freed.wait()
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._freed.set()

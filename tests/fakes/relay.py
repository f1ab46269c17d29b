"""Fakes of what the relay domain talks to."""

from __future__ import annotations

from collections.abc import Sequence


class Directory:
    """`RecipientDirectory` over a set of active user ids; counts its lookups."""

    def __init__(self, *active: str) -> None:
        self.active = set(active)
        self.lookups = 0

    async def is_active(self, user_id: str) -> bool:
        self.lookups += 1
        return user_id in self.active

    async def are_active(self, user_ids: Sequence[str]) -> list[bool]:
        return [await self.is_active(user_id) for user_id in user_ids]

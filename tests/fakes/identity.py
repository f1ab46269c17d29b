"""Fakes of what the identity domain talks to."""

from __future__ import annotations


class RecordingRevoker:
    """`SessionRevoker` that remembers whose sessions it was asked to revoke; set
    `failure` to make the session service unreachable."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.failure: Exception | None = None

    async def revoke_all(self, user_id: str) -> int:
        if self.failure is not None:
            raise self.failure
        self.revoked.append(user_id)
        return 0

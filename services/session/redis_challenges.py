"""Login challenges in Redis, so that any session replica can redeem one another issued.

Issue is `SET ... PX ttl NX` (with the book's backpressure, services.session.login
.ChallengeBook's rules, checked in the same script); take is `GETDEL`: a challenge is
redeemed once across all replicas, and expires on Redis' clock. Redis holds no user id
or address: the value is an HMAC of the user id, the nonce (random, useless without
the user's private key), and an HMAC of the address group.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as redis

from services.common.errors import ResourceExhausted
from services.common.shared_state import KeyNames, mapped_errors
from services.session.login import CHALLENGE_BYTES, Challenge

_LUA = Path(__file__).parent / "lua"
STORE = "login challenge"


class RedisChallengeBook:
    def __init__(
        self,
        client: redis.Redis,
        names: KeyNames,
        ttl: float,
        *,
        capacity: int = 100_000,
        per_group: int = 120,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._names = names
        self._ttl = ttl
        self._capacity = capacity
        self._per_group = per_group
        self._clock = clock
        self._issue = client.register_script((_LUA / "issue.lua").read_text())
        self._take = client.register_script((_LUA / "take.lua").read_text())

    async def issue(self, user_id: str, group: str = "") -> Challenge:
        challenge = Challenge(
            secrets.token_hex(16),
            user_id,
            secrets.token_bytes(CHALLENGE_BYTES),
            self._clock() + self._ttl,
            group,
        )
        value = " ".join(
            (
                self._names.tag("user", user_id),
                challenge.nonce.hex(),
                self._names.tag("group", group),
            )
        )
        with mapped_errors(STORE):
            answer = await self._issue(
                keys=[],
                args=[
                    self._names.prefix, challenge.challenge_id, value, int(self._ttl * 1000),
                    self._names.tag("group", group), self._capacity, self._per_group, "",
                ],
            )  # fmt: skip
        answer = answer.decode() if isinstance(answer, bytes) else str(answer)
        if answer == "full":
            raise ResourceExhausted("too many logins in progress", retry_after=self._ttl)
        if answer == "group":
            raise ResourceExhausted(
                "too many unanswered login challenges from your address; sign the ones "
                "you have or wait for them to expire",
                retry_after=self._ttl,
            )
        return challenge

    async def take(self, challenge_id: str, user_id: str) -> Challenge | None:
        if len(challenge_id) > 64:
            return None
        with mapped_errors(STORE):
            value = await self._take(keys=[], args=[self._names.prefix, challenge_id])
        if not value:
            return None
        user_tag, nonce, _ = (value.decode() if isinstance(value, bytes) else value).split(" ")
        if not hmac.compare_digest(user_tag, self._names.tag("user", user_id)):
            return None  # taken all the same: a challenge is one attempt
        return Challenge(challenge_id, user_id, bytes.fromhex(nonce), self._clock() + 1, "")

    async def count(self) -> int:
        with mapped_errors(STORE):
            await self._client.zremrangebyscore(
                f"{self._names.prefix}challenges", "-inf", int(self._clock() * 1000)
            )
            return int(await self._client.zcard(f"{self._names.prefix}challenges"))

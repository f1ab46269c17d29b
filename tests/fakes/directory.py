"""A fake of the identity service as the session domain sees it (`IdentityDirectory`).

Factor checks here are deliberately simple (a set of valid codes per user); the real
rules are identity's, tested on their own in test_factors.py.
"""

from __future__ import annotations

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from services.common.identity_client import CODE_REFUSED, RECOVERY_LOGIN_REFUSED, LoginKey


class FakeDirectory:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.logins: list[str] = []
        self.second_factor: set[str] = set()  # users with TOTP enabled
        self.codes: dict[str, set[str]] = {}  # valid TOTP and recovery codes, each once
        self.passwords: dict[str, str] = {}
        self.exhausted: set[str] = set()  # users whose password budget is spent
        # Users deactivated after their key was looked up (login_key still answers).
        self.deactivated: set[str] = set()

    async def login_key(self, user_id: str) -> LoginKey | None:
        key = self.keys.get(user_id)
        return None if key is None else LoginKey(key, user_id in self.second_factor)

    async def record_login(self, user_id: str, when: float) -> bool:
        if user_id in self.deactivated:
            return False
        self.logins.append(user_id)
        self.exhausted.discard(user_id)
        return True

    async def is_active(self, user_id: str) -> bool:
        return user_id not in self.deactivated

    def _take(self, user_id: str, code: str) -> bool:
        codes = self.codes.get(user_id, set())
        if code in codes:
            codes.remove(code)
            return True
        return False

    async def verify_second_factor(self, user_id: str, code: str, recovery_code: str) -> str:
        if bool(code) == bool(recovery_code):
            raise InvalidArgument("send exactly one of code and recovery_code")
        if code and user_id not in self.second_factor:
            raise FailedPrecondition("no TOTP second factor")
        if not self._take(user_id, code or recovery_code):
            raise Unauthenticated(CODE_REFUSED)
        return "totp" if code else "recovery_code"

    async def verify_password(
        self, user_id: str, password: str, code: str, recovery_code: str
    ) -> str:
        if user_id in self.exhausted:
            raise ResourceExhausted("too many failed password logins", retry_after=60)
        if self.passwords.get(user_id) != password:
            raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
        if user_id in self.second_factor or code or recovery_code:
            if not self._take(user_id, code or recovery_code):
                raise Unauthenticated(RECOVERY_LOGIN_REFUSED)
            return "totp" if code else "recovery_code"
        return "none"

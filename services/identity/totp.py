"""TOTP (RFC 6238) through pyotp: secrets, otpauth:// URIs, and which time step a code
belongs to.

The step matters more than "valid or not": a code is accepted at most once, so the
caller remembers the last accepted step and refuses any step not after it.
"""

from __future__ import annotations

import hmac

import pyotp

DIGITS = 6
PERIOD_SECONDS = 30
ISSUER = "SecureMsg"
SECRET_CHARS = 32  # base32: 160 bits, the HMAC-SHA1 block RFC 4226 recommends
SKEW_STEPS = 1  # one step either side of the server's clock, as RFC 6238 suggests


def new_secret() -> str:
    return pyotp.random_base32(SECRET_CHARS)


def provisioning_uri(secret: str, user_id: str) -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD_SECONDS).provisioning_uri(
        name=user_id, issuer_name=ISSUER
    )


def step_of(now: float) -> int:
    return int(now // PERIOD_SECONDS)


def matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step (within the allowed skew) whose code `code` is, or None.

    Every candidate is compared, in constant time, so the answer's timing does not say
    which step matched or how much of the code was right.
    """
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD_SECONDS)
    current = step_of(now)
    found = None
    for step in range(current - SKEW_STEPS, current + SKEW_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


def code_at(secret: str, when: float) -> str:
    """The code an authenticator shows at `when` (for clients and tests)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD_SECONDS).at(when)

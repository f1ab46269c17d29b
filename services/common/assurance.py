"""Session assurance as every service names it: levels, scopes, and what a refused call
is told to do. The session service decides levels and scopes; the others read them from
ValidateSession (services.common.auth) and only compare.

Names are the proto enum names (securemsg.session.v1.AssuranceLevel, SessionScope)
without their prefix, lower-cased.
"""

from __future__ import annotations

from securemsg.session.v1 import session_pb2

DEVICE_KEY = "device_key"
DEVICE_KEY_AND_SECOND_FACTOR = "device_key_and_second_factor"
PASSWORD = "password"  # noqa: S105 (a level name)
PASSWORD_AND_SECOND_FACTOR = "password_and_second_factor"  # noqa: S105

FULL = "full"
STEP_UP_REQUIRED = "step_up_required"
RECOVERY = "recovery"

RESTRICTED = (
    "this session is restricted: a login to an account with a second factor must step up "
    "first (SessionService.StepUpSession with a code), and a recovery session may only "
    "replace the account's keys, deactivate it, or log out"
)
RESTRICTED_SCOPE = {
    STEP_UP_REQUIRED: "this session must step up first: call SessionService.StepUpSession "
    "with a code from your authenticator app (or a recovery code)",
    RECOVERY: "a recovery session may only replace the account's keys "
    "(IdentityService.ReplaceAccountKeys), deactivate the account, or log out",
    FULL: "this call needs a recovery session",
}
STEP_UP_NEEDED = (
    "this call is sensitive and needs a recent step-up: call SessionService.StepUpSession "
    "(with a second-factor code, or a new device-key signature if the account has none), "
    "then repeat the call"
)

_LEVEL_PREFIX = "ASSURANCE_LEVEL_"
_SCOPE_PREFIX = "SESSION_SCOPE_"


def level_name(value: int) -> str:
    return session_pb2.AssuranceLevel.Name(value).removeprefix(_LEVEL_PREFIX).lower()  # type: ignore[arg-type]


def scope_name(value: int) -> str:
    return session_pb2.SessionScope.Name(value).removeprefix(_SCOPE_PREFIX).lower()  # type: ignore[arg-type]


def level_value(name: str) -> session_pb2.AssuranceLevel.ValueType:
    return session_pb2.AssuranceLevel.Value(_LEVEL_PREFIX + name.upper())


def scope_value(name: str) -> session_pb2.SessionScope.ValueType:
    return session_pb2.SessionScope.Value(_SCOPE_PREFIX + name.upper())

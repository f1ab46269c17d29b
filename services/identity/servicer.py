"""gRPC transport for identity: authenticate, convert, delegate to `Identity`.

Domain calls block on SQLite, so they run in worker threads to keep the event loop free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from securemsg.identity.v1 import identity_admin_service_pb2 as admin_pb
from securemsg.identity.v1 import identity_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2 as pb
from securemsg.identity.v1 import identity_service_pb2_grpc as pb_grpc
from securemsg.identity.v1 import keys_pb2

from services.common import assurance, convert
from services.common.addresses import ClientAddresses
from services.common.auth import SessionChecker, authenticate_for
from services.common.peers import Context
from services.identity import factors as factor_names
from services.identity.domain import Bundle, Identity, Registration
from services.identity.factors import Factors, FactorSummary
from services.identity.keys import OneTimePrekey, SignedKey, fingerprint
from services.identity.model import User

_SECOND_FACTOR = {
    factor_names.NONE: internal_pb.SECOND_FACTOR_UNSPECIFIED,
    factor_names.TOTP: internal_pb.SECOND_FACTOR_TOTP,
    factor_names.RECOVERY_CODE: internal_pb.SECOND_FACTOR_RECOVERY_CODE,
}
# Deactivating and replacing keys is what a recovery session is for.
_RECOVERY_OK = frozenset({assurance.FULL, assurance.RECOVERY})


def _signed_key(message: keys_pb2.SignedPrekey | keys_pb2.PqPrekey) -> SignedKey:
    return SignedKey(message.key_id, message.public_key, message.signature)


def _one_time(messages: object) -> list[OneTimePrekey]:
    return [OneTimePrekey(m.key_id, m.public_key) for m in messages]  # type: ignore[attr-defined]


def registration_from_request(request: pb.RegisterUserRequest) -> Registration:
    """The domain's view of a RegisterUser request; absent prekeys become None."""
    return Registration(
        user_id=request.user_id,
        alias=request.alias,
        metadata=dict(request.metadata),
        identity_key=request.identity_key,
        verify_key=request.verify_key,
        signed_prekey=(
            _signed_key(request.signed_prekey) if request.HasField("signed_prekey") else None
        ),
        pq_prekey=_signed_key(request.pq_prekey) if request.HasField("pq_prekey") else None,
        one_time_prekeys=_one_time(request.one_time_prekeys),
    )


def _profile(user: User, factors: FactorSummary) -> pb.Profile:
    return pb.Profile(
        second_factor_enabled=factors.second_factor_enabled,
        recovery_codes_remaining=factors.recovery_codes_remaining,
        password_set=factors.password_set,
        user_id=user.user_id,
        alias=user.alias,
        metadata=user.metadata,
        fingerprint=fingerprint(user.identity_key, user.verify_key),
        create_time=convert.timestamp(user.create_time),
        last_login_time=convert.optional_timestamp(user.last_login_time),
        one_time_prekey_count=user.one_time_prekey_count,
    )


def _bundle(bundle: Bundle) -> keys_pb2.KeyBundle:
    otk = bundle.one_time_prekey
    return keys_pb2.KeyBundle(
        user_id=bundle.user_id,
        identity_key=bundle.identity_key,
        verify_key=bundle.verify_key,
        signed_prekey=keys_pb2.SignedPrekey(
            key_id=bundle.signed_prekey.key_id,
            public_key=bundle.signed_prekey.public_key,
            signature=bundle.signed_prekey.signature,
        ),
        pq_prekey=keys_pb2.PqPrekey(
            key_id=bundle.pq_prekey.key_id,
            public_key=bundle.pq_prekey.public_key,
            signature=bundle.pq_prekey.signature,
        ),
        one_time_prekey=(
            keys_pb2.OneTimePrekey(key_id=otk.key_id, public_key=otk.public_key) if otk else None
        ),
        fingerprint=bundle.fingerprint,
    )


def _keys(request: pb.ReplaceAccountKeysRequest) -> Registration:
    return Registration(
        user_id="",
        alias="",
        metadata={},
        identity_key=request.identity_key,
        verify_key=request.verify_key,
        signed_prekey=(
            _signed_key(request.signed_prekey) if request.HasField("signed_prekey") else None
        ),
        pq_prekey=_signed_key(request.pq_prekey) if request.HasField("pq_prekey") else None,
        one_time_prekeys=_one_time(request.one_time_prekeys),
    )


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(
        self,
        identity: Identity,
        factors: Factors,
        tokens: SessionChecker,
        addresses: ClientAddresses | None = None,
    ) -> None:
        self._identity = identity
        self._factors = factors
        self._tokens = tokens
        self._addresses = addresses or ClientAddresses()

    async def RegisterUser(
        self, request: pb.RegisterUserRequest, context: Context
    ) -> pb.RegisterUserResponse:
        registration = registration_from_request(request)
        user = await asyncio.to_thread(
            self._identity.register, registration, self._addresses.of(context)
        )
        return pb.RegisterUserResponse(profile=_profile(user, FactorSummary(False, 0, False)))

    async def GetOwnProfile(
        self, request: pb.GetOwnProfileRequest, context: Context
    ) -> pb.GetOwnProfileResponse:
        caller = await authenticate_for(context, self._tokens)
        user = await asyncio.to_thread(self._identity.profile, caller.user_id)
        summary = await asyncio.to_thread(self._factors.summary, caller.user_id)
        return pb.GetOwnProfileResponse(profile=_profile(user, summary))

    async def GetKeyBundle(
        self, request: pb.GetKeyBundleRequest, context: Context
    ) -> pb.GetKeyBundleResponse:
        caller = await authenticate_for(context, self._tokens)
        bundle = await asyncio.to_thread(self._identity.bundle, request.user_id, caller.user_id)
        return pb.GetKeyBundleResponse(bundle=_bundle(bundle))

    async def UploadOneTimePrekeys(
        self, request: pb.UploadOneTimePrekeysRequest, context: Context
    ) -> pb.UploadOneTimePrekeysResponse:
        caller = await authenticate_for(context, self._tokens)
        count = await asyncio.to_thread(
            self._identity.upload_one_time_prekeys,
            caller.user_id,
            _one_time(request.one_time_prekeys),
        )
        return pb.UploadOneTimePrekeysResponse(one_time_prekey_count=count)

    async def GetPrekeyCount(
        self, request: pb.GetPrekeyCountRequest, context: Context
    ) -> pb.GetPrekeyCountResponse:
        caller = await authenticate_for(context, self._tokens)
        count = await asyncio.to_thread(self._identity.prekey_count, caller.user_id)
        return pb.GetPrekeyCountResponse(one_time_prekey_count=count)

    async def RotateSignedPrekey(
        self, request: pb.RotateSignedPrekeyRequest, context: Context
    ) -> pb.RotateSignedPrekeyResponse:
        caller = await authenticate_for(context, self._tokens)
        bundle = await asyncio.to_thread(
            self._identity.rotate_signed_prekey,
            caller.user_id,
            _signed_key(request.signed_prekey) if request.HasField("signed_prekey") else None,
            _signed_key(request.pq_prekey) if request.HasField("pq_prekey") else None,
        )
        return pb.RotateSignedPrekeyResponse(bundle=_bundle(bundle))

    async def DeactivateAccount(
        self, request: pb.DeactivateAccountRequest, context: Context
    ) -> pb.DeactivateAccountResponse:
        caller = await authenticate_for(
            context, self._tokens, scopes=_RECOVERY_OK, recent_step_up=True
        )
        by = "recovery" if caller.scope == assurance.RECOVERY else "owner"
        when = await self._identity.deactivate(caller.user_id, by)
        return pb.DeactivateAccountResponse(deactivate_time=convert.timestamp(when))

    async def BeginTotpEnrollment(
        self, request: pb.BeginTotpEnrollmentRequest, context: Context
    ) -> pb.BeginTotpEnrollmentResponse:
        caller = await authenticate_for(context, self._tokens, recent_step_up=True)
        enrollment = await asyncio.to_thread(self._factors.begin_totp, caller.user_id)
        return pb.BeginTotpEnrollmentResponse(
            secret=enrollment.secret,
            otpauth_uri=enrollment.uri,
            digits=enrollment.digits,
            period_seconds=enrollment.period_seconds,
        )

    async def ActivateTotp(
        self, request: pb.ActivateTotpRequest, context: Context
    ) -> pb.ActivateTotpResponse:
        caller = await authenticate_for(context, self._tokens)
        codes = await asyncio.to_thread(self._factors.activate_totp, caller.user_id, request.code)
        return pb.ActivateTotpResponse(recovery_codes=codes)

    async def RemoveTotp(
        self, request: pb.RemoveTotpRequest, context: Context
    ) -> pb.RemoveTotpResponse:
        caller = await authenticate_for(context, self._tokens, recent_step_up=True)
        await asyncio.to_thread(
            self._factors.remove_totp, caller.user_id, request.code, request.recovery_code
        )
        return pb.RemoveTotpResponse()

    async def RegenerateRecoveryCodes(
        self, request: pb.RegenerateRecoveryCodesRequest, context: Context
    ) -> pb.RegenerateRecoveryCodesResponse:
        caller = await authenticate_for(context, self._tokens, recent_step_up=True)
        codes = await asyncio.to_thread(self._factors.regenerate_recovery_codes, caller.user_id)
        return pb.RegenerateRecoveryCodesResponse(recovery_codes=codes)

    async def SetPassword(
        self, request: pb.SetPasswordRequest, context: Context
    ) -> pb.SetPasswordResponse:
        caller = await authenticate_for(context, self._tokens, recent_step_up=True)
        await asyncio.to_thread(self._factors.set_password, caller.user_id, request.password)
        return pb.SetPasswordResponse()

    async def ReplaceAccountKeys(
        self, request: pb.ReplaceAccountKeysRequest, context: Context
    ) -> pb.ReplaceAccountKeysResponse:
        caller = await authenticate_for(
            context, self._tokens, scopes=_RECOVERY_OK, recent_step_up=True
        )
        user, revoked = await self._identity.replace_keys(
            caller.user_id,
            _keys(request),
            by="recovery" if caller.scope == assurance.RECOVERY else "owner",
            keep_session_id=caller.session_id,
        )
        summary = await asyncio.to_thread(self._factors.summary, caller.user_id)
        return pb.ReplaceAccountKeysResponse(
            profile=_profile(user, summary), revoked_session_count=revoked
        )


class IdentityInternalServicer(internal_grpc.IdentityInternalServiceServicer):
    def __init__(self, identity: Identity, factors: Factors) -> None:
        self._identity = identity
        self._factors = factors

    async def GetVerifyKey(
        self, request: internal_pb.GetVerifyKeyRequest, context: Context
    ) -> internal_pb.GetVerifyKeyResponse:
        key = await asyncio.to_thread(self._identity.verify_key, request.user_id)
        enabled = await asyncio.to_thread(self._factors.second_factor_enabled, request.user_id)
        return internal_pb.GetVerifyKeyResponse(verify_key=key, second_factor_enabled=enabled)

    async def VerifySecondFactor(
        self, request: internal_pb.VerifySecondFactorRequest, context: Context
    ) -> internal_pb.VerifySecondFactorResponse:
        used = await asyncio.to_thread(
            self._factors.verify_second_factor,
            request.user_id,
            request.code,
            request.recovery_code,
        )
        return internal_pb.VerifySecondFactorResponse(second_factor=_SECOND_FACTOR[used])

    async def VerifyPassword(
        self, request: internal_pb.VerifyPasswordRequest, context: Context
    ) -> internal_pb.VerifyPasswordResponse:
        used = await asyncio.to_thread(
            self._factors.verify_password,
            request.user_id,
            request.password,
            request.code,
            request.recovery_code,
        )
        return internal_pb.VerifyPasswordResponse(second_factor=_SECOND_FACTOR[used])

    async def RecordLogin(
        self, request: internal_pb.RecordLoginRequest, context: Context
    ) -> internal_pb.RecordLoginResponse:
        when = (
            convert.seconds(request.login_time, "login_time")
            if request.HasField("login_time")
            else None
        )
        await asyncio.to_thread(self._identity.record_login, request.user_id, when)
        return internal_pb.RecordLoginResponse()

    async def GetUserStatus(
        self, request: internal_pb.GetUserStatusRequest, context: Context
    ) -> internal_pb.GetUserStatusResponse:
        exists, active = await asyncio.to_thread(self._identity.status, request.user_id)
        return internal_pb.GetUserStatusResponse(exists=exists, active=active)


class IdentityAdminServicer(admin_grpc.IdentityAdminServiceServicer):
    def __init__(self, identity: Identity, audit_backlog: Callable[[], int]) -> None:
        self._identity = identity
        self._audit_backlog = audit_backlog  # the outbox is storage: only its size here

    async def GetIdentityStats(
        self, request: admin_pb.GetIdentityStatsRequest, context: Context
    ) -> admin_pb.GetIdentityStatsResponse:
        counts = await asyncio.to_thread(self._identity.counts)
        backlog = await asyncio.to_thread(self._audit_backlog)
        return admin_pb.GetIdentityStatsResponse(
            audit_outbox_backlog=backlog,
            registered_users=counts.registered,
            active_users=counts.active,
            deactivated_users=counts.deactivated,
            one_time_prekeys=counts.one_time_prekeys,
            users_without_one_time_prekeys=counts.active_without_prekeys,
        )

    async def DeactivateUser(
        self, request: admin_pb.DeactivateUserRequest, context: Context
    ) -> admin_pb.DeactivateUserResponse:
        when = await self._identity.deactivate(request.user_id, "operator")
        return admin_pb.DeactivateUserResponse(deactivate_time=convert.timestamp(when))

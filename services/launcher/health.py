"""Waiting for services to report SERVING through the standard gRPC health API."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import catalog


def check(address: str, service: str, ca_file: Path | None, timeout: float = 1.0) -> str:
    """The health status name of `service` at `address`, or the gRPC error code name."""
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_serving(
    address: str, service: str, ca_file: Path | None, *, deadline: float, alive: object = None
) -> None:
    """Blocks until SERVING; raises TimeoutError with the last status seen."""
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"{service} exited before it was serving")
        status = check(address, service, ca_file)
        if status == "SERVING":
            return
        time.sleep(0.1)
    raise TimeoutError(f"{service} at {address} not serving (last status {status})")


def main() -> int:
    """Container health check: `python -m services.launcher.health <service>`.

    Asks the service's own public port, over TLS with its configured CA, whether the
    service's main API is SERVING; exit status 0 only then.
    """
    service = sys.argv[1]
    port = os.environ.get("LISTEN_ADDRESS", "").rpartition(":")[2]
    ca = os.environ.get("TLS_CA_FILE")
    status = check(
        f"localhost:{port}",
        catalog.public_api(service).full_name,
        Path(ca) if ca else None,
    )
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())

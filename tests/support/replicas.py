"""More than one process of a service on one PostgreSQL database, for scale-out tests."""

from __future__ import annotations

import grpc

from tests.support.stack import ServiceProcess, Stack, free_port


def add_replica(stack: Stack, name: str, label: str) -> ServiceProcess:
    """Another process of `name` on its own ports, sharing its database, keys and peers."""
    public, internal, metrics = free_port(), free_port(), free_port()
    env = {
        **stack[name].env,
        "LISTEN_ADDRESS": f"127.0.0.1:{public}",
        "INTERNAL_LISTEN_ADDRESS": f"127.0.0.1:{internal}",
        "METRICS_ADDRESS": f"127.0.0.1:{metrics}",
    }
    return ServiceProcess(
        name, env, stack.layout.logs / f"{name}-{label}.log", stack.layout.tls / "ca.pem"
    )


def channel_to(stack: Stack, process: ServiceProcess, cert: str | None = None) -> grpc.Channel:
    """TLS to a process's public port, or with client certificate `cert` to its internal one."""
    tls = stack.layout.tls
    ca = (tls / "ca.pem").read_bytes()
    if cert is None:
        return grpc.secure_channel(
            process.env["LISTEN_ADDRESS"], grpc.ssl_channel_credentials(root_certificates=ca)
        )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(tls / f"{cert}.key").read_bytes(),
        certificate_chain=(tls / f"{cert}.pem").read_bytes(),
    )
    return grpc.secure_channel(process.env["INTERNAL_LISTEN_ADDRESS"], credentials)

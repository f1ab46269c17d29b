# syntax=docker/dockerfile:1
# One image for all four services; the compose file picks the module to run.
# Build: docker build -t securemsg-backend .   (or: podman build -t securemsg-backend .)
#
# BASE_IMAGE: any Debian-like image with Python 3.11+ (`python` on PATH, venv, useradd).
# The official image is the default; the compose test passes one made offline from
# Debian's packages, since it cannot pull from an image registry.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt constraints.txt ./
# Behind a TLS-inspecting proxy or with a private index, give pip the host's settings as
# build secrets, which never end up in a layer: `--secret id=pip_ca,src=<CA bundle>`
# (used as pip's `cert`) and `--secret id=pip_conf,src=<pip.conf>`. Verification stays on.
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
 && if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.txt -c constraints.txt \
 && python -m venv /opt/tools \
 && /opt/tools/bin/pip install grpcio-tools==1.85.1 -c constraints.txt
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY scripts ./scripts
RUN /opt/tools/bin/python scripts/gen_protos.py --runtime-only
COPY services ./services
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
 && if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && /opt/venv/bin/pip install --no-deps .

FROM ${BASE_IMAGE}
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin securemsg \
 && mkdir /data && chown 10001:10001 /data && chmod 0700 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /data
EXPOSE 50051 50052 50053 50054 50061 50062 50063 50064
CMD ["python", "-m", "services.identity"]

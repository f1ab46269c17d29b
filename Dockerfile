# One image for all four services; the compose file picks the module to run.
# Build: docker build -t securemsg-backend .

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt constraints.txt ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.txt -c constraints.txt \
 && python -m venv /opt/tools \
 && /opt/tools/bin/pip install grpcio-tools==1.85.1 -c constraints.txt
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY scripts ./scripts
RUN /opt/tools/bin/python scripts/gen_protos.py --runtime-only
COPY services ./services
RUN /opt/venv/bin/pip install --no-deps .

FROM python:3.11-slim
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

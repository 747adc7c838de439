# weightserve server image (CPU torch by default).
#
#   make docker                                   # docker build -t weightserve:$(VERSION) .
#   docker run -p 50051:50051 -p 9400:9400 -v /path/to/models:/models:ro weightserve:0.1.0
#
# Pin the base image by digest for a reproducible build (the default is a tag, since a
# digest cannot be checked without reaching a registry):
#   --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>
# For arm64: docker buildx build --platform linux/arm64 -t weightserve:0.1.0-arm64 .
# (the CPU torch index has aarch64 wheels; a CUDA build needs an index with them).
# For a CUDA build of torch, pass its index and spec, for example
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_SPEC=torch==2.13.0
#
# podman and buildah write OCI images by default, and the OCI format has no HEALTHCHECK:
# build with `podman build --format docker` to keep it. Kubernetes ignores HEALTHCHECK
# either way; deploy/k8s probes /readyz and /livez on the metrics port instead.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and from its own index: an unpinned torch pulled in as a dependency of
# weightserve would be a multi-GB CUDA build. TORCH_SPEC carries the pin.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml hatch_build.py README.md ./
COPY proto ./proto
COPY src ./src
# The build hook generates the gRPC stubs from proto/ into the installed package; the
# package is this tree, and its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[hf,s3,gguf,fleet]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="weightserve" \
      org.opencontainers.image.description="gRPC weight-serving microservice for LLM inference: per-rank checkpoint shards, checksummed and resumable" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# HF_HOME and the disk cache (XDG_CACHE_HOME/weightserve, what --disk-cache-dir
# defaults to) share one directory, the one VOLUME that takes downloads: with a read-only
# root filesystem it is the only place (with /tmp) the server writes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache \
    HF_HOME=/var/cache/weightserve/huggingface
RUN groupadd --system --gid 10001 weightserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/weightserve weightserve \
    && mkdir -p /models /var/cache/weightserve/huggingface \
    && chown weightserve:weightserve /models /var/cache/weightserve /var/cache/weightserve/huggingface
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/weightserve
VOLUME ["/models", "/var/cache/weightserve"]
# 50051: gRPC (WeightService, ControlService, health, reflection); 9400: /metrics,
# /readyz and /livez in plain HTTP (--metrics-listen).
EXPOSE 50051 9400
# The standard grpc.health.v1 check. With TLS on, set WEIGHTSERVE_TLS_CA and
# WEIGHTSERVE_TLS_SERVER_NAME (a name the certificate carries), or rely on an
# orchestrator's probes of /readyz instead.
HEALTHCHECK --interval=15s --timeout=6s --start-period=30s --retries=3 \
    CMD ["weightserve", "health", "--server", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["weightserve"]
CMD ["serve", "--model-root", "/models", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9400"]

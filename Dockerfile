# weightserve server image (CPU torch by default).
#
#   docker build -t weightserve .
#   docker run -p 50051:50051 -v /path/to/models:/models:ro weightserve
#
# For a CUDA build of torch, pass its index and spec, for example
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_SPEC=torch==2.13.0

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
# The build hook generates the gRPC stubs from proto/ into the installed package.
RUN pip install ".[hf,s3,gguf]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --create-home --home-dir /home/weightserve weightserve \
    && mkdir /models \
    && chown weightserve /models
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/weightserve
VOLUME ["/models"]
# 50051: gRPC (WeightService, ControlService, health, reflection).
EXPOSE 50051
# Standard grpc.health.v1 check on the plaintext port; with TLS on, probe from outside.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["weightserve"]
CMD ["serve", "--model-root", "/models", "--listen", "0.0.0.0:50051"]

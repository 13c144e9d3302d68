# syntax=docker/dockerfile:1.7
#
# One image for every KubeChain process; the command picks the role:
#   kubechain watcher
#   kubechain worker --queues llm --pool threads --concurrency 64        (the default CMD is `worker`)
#
# It also carries Node.js (node/npm/npx) and uv/uvx, so stdio MCP servers such as
# `uvx mcp-server-fetch` or `npx -y @modelcontextprotocol/server-filesystem /data` run inside worker pods.
# Runs as uid/gid 65532 (non-root); all writable state lives under $HOME=/home/kubechain (mount an
# emptyDir there and at /tmp when the root filesystem is read-only, as deploy/base does).
#
#   docker build -t ghcr.io/kubechain/kubechain:0.1.0 .         (or: podman build / buildah bud)
#
# The base images are build arguments so that a mirror can be used:
#   --build-arg PYTHON_IMAGE=mirror.example/python:3.11-slim-bookworm --build-arg NODE_IMAGE=...

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:24-bookworm-slim

# ---------------------------------------------------------------- node: only its runtime is copied
FROM ${NODE_IMAGE} AS node

# ---------------------------------------------------------------- build: wheels for the project + deps
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first (better layer caching): resolve them from pyproject.toml alone.
COPY pyproject.toml README.md ./
RUN mkdir -p kubechain watcher workers \
 && touch kubechain/__init__.py watcher/__init__.py workers/__init__.py \
 && pip wheel --wheel-dir /wheels . \
 && rm -f /wheels/kubechain-*.whl
COPY kubechain ./kubechain
COPY watcher ./watcher
COPY workers ./workers
RUN rm -rf build *.egg-info \
 && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- final
FROM ${PYTHON_IMAGE}
ARG UID=65532
ARG GID=65532

LABEL org.opencontainers.image.title="kubechain" \
      org.opencontainers.image.description="Kubernetes-native orchestrator for AI agents (watcher + Celery workers)" \
      org.opencontainers.image.source="https://github.com/kubechain/kubechain" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini: PID 1 that forwards SIGTERM (Celery's warm shutdown: running tasks finish) and reaps MCP server
# subprocesses.
# libstdc++6: needed by node.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates libstdc++6 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --gid "${GID}" kubechain \
 && useradd --uid "${UID}" --gid "${GID}" --home-dir /home/kubechain --create-home \
      --shell /usr/sbin/nologin kubechain

# Node.js runtime with npm and npx (from the official image of the same Debian release).
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && node --version && npm --version && npx --version

# The application venv: installed offline from the wheels of the build stage (which never land in a
# layer of this image), without pip in the venv itself.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
 && PIP_DISABLE_PIP_VERSION_CHECK=1 pip --python /opt/venv/bin/python install \
      --no-cache-dir --no-index --find-links=/wheels kubechain \
 && /opt/venv/bin/kubechain --help >/dev/null \
 && /opt/venv/bin/uvx --version

# uvx uses the image's Python and keeps its caches under $HOME (an emptyDir in deploy/base); npx too,
# without update or funding notices (a stdio MCP server's stdout must stay clean).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/kubechain \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_CACHE_DIR=/home/kubechain/.cache/uv \
    UV_TOOL_DIR=/home/kubechain/.local/share/uv/tools \
    UV_LINK_MODE=copy \
    npm_config_cache=/home/kubechain/.npm \
    npm_config_update_notifier=false \
    npm_config_fund=false \
    npm_config_audit=false \
    NODE_ENV=production

USER 65532:65532
WORKDIR /home/kubechain
EXPOSE 9090
ENTRYPOINT ["/usr/bin/tini", "--", "kubechain"]
CMD ["worker"]

# meshguard: two images from one build.
#   docker build -t ghcr.io/meshguard/meshguard:0.1.0 .
#       the webhook and the authz server (the last stage: the default target)
#   docker build --target init -t ghcr.io/meshguard/meshguard-init:0.1.0 .
#       meshguard-init and meshguard-validation in every pod, the CNI plugin on the nodes:
#       the core install only (no servers' libraries), both iptables variants and nftables

# --- build-init, build: the project in two virtualenvs (core only; with the server extra) ---
# Each virtualenv is built at the path its image runs it from (/opt/meshguard): pip writes
# that path into every console script's shebang (#!/opt/meshguard/bin/python), so a
# virtualenv that a COPY moves elsewhere cannot start its entrypoint. One stage each, as
# both use the same path. tests/test_image.py replays these steps and runs each image's
# entrypoint the way the chart does.
FROM python:3.11.11-slim-bookworm AS build-init
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY meshguard /src/meshguard
# The README way (pip install of the project), without the editable flag or test extra.
# The init venv keeps no pip or setuptools: nothing installs into it at run time.
RUN python -m venv /opt/meshguard \
 && /opt/meshguard/bin/pip install /src \
 && /opt/meshguard/bin/pip uninstall -y -q pip setuptools

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY meshguard /src/meshguard
RUN python -m venv /opt/meshguard \
 && /opt/meshguard/bin/pip install "/src[server]"

# --- shim: the static CNI executable the node agent places in the node's CNI bin dir ---------
# (it forwards each CNI call to the agent's socket; static, so it runs on any node's libc)
FROM python:3.11.11-slim-bookworm AS shim
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY cni-shim /src/cni-shim
RUN gcc -static -Os -Wall -Wextra -Werror -o /meshguard-cni /src/cni-shim/meshguard-cni.c

# --- init: meshguard-init, meshguard-validation, the CNI plugin -----------------------------
FROM python:3.11.11-slim-bookworm AS init
# iptables ships both variants (iptables-legacy, iptables-nft); nftables for native nftables
# pods; iproute2 for the IPv6 loopback addresses meshguard-init adds.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 meshguard \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin meshguard
COPY --from=build-init /opt/meshguard /opt/meshguard
# the chart's cni.pluginBinary
COPY --from=shim /meshguard-cni /opt/meshguard/cni/meshguard-cni
ENV PATH=/opt/meshguard/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# meshguard-init runs as uid 0 with NET_ADMIN/NET_RAW, meshguard-validation as a uid of no
# container (both set by their securityContext); the default user is not root.
USER 65532:65532
ENTRYPOINT ["meshguard"]
CMD ["--help"]

# --- runtime: the servers, slim, iptables for meshguard-init, non-root by default -----------
FROM python:3.11.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 meshguard \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin meshguard
COPY --from=build /opt/meshguard /opt/meshguard
ENV PATH=/opt/meshguard/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The webhook and the authz server run as this user. (meshguard-init can still run from
# this image, as before: the chart's init.image points at the slim one.)
USER 65532:65532
ENTRYPOINT ["meshguard"]
CMD ["--help"]

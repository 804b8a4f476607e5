# meshguard: one image for the webhook, the authz server and meshguard-init.
# Build: docker build -t ghcr.io/meshguard/meshguard:0.1.0 .

# --- build: the project and its runtime dependencies in a virtualenv -----------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meshguard
COPY pyproject.toml README.md /src/
COPY meshguard /src/meshguard
# The README way (pip install of the project), without the editable flag or test extra.
RUN /opt/meshguard/bin/pip install /src

# --- runtime: slim, iptables for meshguard-init, non-root by default -------------------------
FROM python:3.11.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 meshguard \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin meshguard
COPY --from=build /opt/meshguard /opt/meshguard
ENV PATH=/opt/meshguard/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# meshguard-init runs this image as uid 0 with NET_ADMIN/NET_RAW (set by its securityContext);
# the webhook and the authz server run as this user.
USER 65532:65532
ENTRYPOINT ["meshguard"]
CMD ["--help"]

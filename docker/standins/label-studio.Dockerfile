# A local stand-in for the official heartexlabs/label-studio:1.23.2 image, for machines that cannot pull it
# (tests/test_containers.py builds it). Same version, port, data directory, user id and environment variables as
# the official image for what docker/compose.yaml uses: LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN,
# LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN, LABEL_STUDIO_ML_BLOCK_LOCAL_IP, data in /label-studio/data, port 8080.
# Not the official image: SQLite and Django's server as `label-studio start` runs them (no nginx, no uwsgi).
#
#   podman build -f docker/standins/label-studio.Dockerfile --build-arg BASE_IMAGE=localhost/debian:bookworm \
#       --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt -t localhost/segmask-label-studio-standin:1.23.2 docker
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG LABEL_STUDIO_VERSION=1.23.2
ARG PIP_INDEX_URL=
ARG PIP_CERT=
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/label-studio/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/label-studio
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    [ -n "$PIP_CERT" ] || unset PIP_CERT; [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    set -e; pip install "label-studio==${LABEL_STUDIO_VERSION}"; pip show label-studio | grep -qx "Version: ${LABEL_STUDIO_VERSION}"
RUN groupadd --gid 1001 labelstudio \
    && useradd --uid 1001 --gid 1001 --home-dir /label-studio --shell /usr/sbin/nologin labelstudio \
    && mkdir -p /label-studio/data && chown -R 1001:1001 /label-studio
ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data PYTHONUNBUFFERED=1 HOME=/label-studio
USER 1001
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]

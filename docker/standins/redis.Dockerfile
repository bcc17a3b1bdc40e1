# A local stand-in for the official redis image (Debian bookworm's redis-server 7.0), for machines that cannot pull
# it (tests/test_containers.py builds it). Runs the command docker/compose.yaml gives it (redis-server ...), as the
# user redis, with its data in /data like the official image.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--dir", "/data", "--protected-mode", "no"]

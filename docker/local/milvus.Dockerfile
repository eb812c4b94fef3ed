# Milvus standalone from the PyPI package `milvus` (its embedded build: one process with its
# own etcd and local storage), for the locally built stack (docker-compose.local.yml) and its
# tests. Production runs the official milvusdb/milvus image (docker-compose.yml).
#
# Built by docker/local/build.py from a context holding this file, milvus_server.py and
# wheels/ (the `milvus` wheel): no registry, no index, no network.
ARG BASE_IMAGE=dns-milvus/base:bookworm

FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
COPY milvus_server.py /opt/milvus/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels milvus \
    && /opt/venv/bin/python /opt/milvus/milvus_server.py prepare

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/milvus /opt/milvus
ENV PYTHONUNBUFFERED=1 \
    MILVUS_PORT=19530 \
    MILVUS_HEALTH_PORT=9091 \
    MILVUS_DATA=/var/lib/milvus \
    MILVUS_HOME=/opt/milvus
VOLUME /var/lib/milvus
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/milvus/milvus_server.py", "health"]
# The launcher execs milvus, which stops cleanly on SIGTERM (give it `docker stop -t 30`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/venv/bin/python", "/opt/milvus/milvus_server.py"]
CMD ["run"]

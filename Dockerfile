# pacs-ai-node: the DICOM AI listener node (DIMSE 11112, HTTP 8080). Not for clinical use.
# Secure by default: HTTP (DICOMweb, /admin, /metrics) listens beyond the container's loopback only when a token is
# given, e.g. `docker run -e PACSNODE_NODE__DICOMWEB_TOKEN=... -p 8080:8080 ...`; without one the entrypoint keeps
# HTTP on 127.0.0.1 (the healthcheck still works) and DIMSE alone is published.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PACSNODE_NODE__DATA_DIR=/data \
    PACSNODE_NODE__HOST=0.0.0.0 \
    PACSNODE_NODE__PORT=11112 \
    PACSNODE_NODE__HTTP_PORT=8080

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin pacsnode \
    && mkdir -p /data /app \
    && chown pacsnode:pacsnode /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY node ./node
COPY models ./models
COPY config ./config
COPY deploy/docker-entrypoint.sh /usr/local/bin/pacsnode-entrypoint
# Optional extras (e.g. --build-arg EXTRAS=postgres for the PostgreSQL driver; docker-compose.scale.yml sets it).
ARG EXTRAS=""
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && python -c "import node.service, models.registry"

USER pacsnode
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pacsnode-entrypoint"]
CMD ["pacsnode", "serve", "--config", "/app/config/node.toml"]

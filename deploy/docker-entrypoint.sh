#!/bin/sh
# The container's entrypoint: serve HTTP on all interfaces only when a DICOMweb token is set (secure by default).
# An explicit PACSNODE_NODE__HTTP_HOST wins; without a token the node itself refuses a non-loopback HTTP bind.
set -eu
if [ -n "${PACSNODE_NODE__DICOMWEB_TOKEN:-}" ]; then
    export PACSNODE_NODE__HTTP_HOST="${PACSNODE_NODE__HTTP_HOST:-0.0.0.0}"
else
    echo "pacsnode: PACSNODE_NODE__DICOMWEB_TOKEN is not set: HTTP (DICOMweb, /admin, /metrics) stays on the" \
         "container's loopback; DIMSE is served" >&2
fi
exec "$@"

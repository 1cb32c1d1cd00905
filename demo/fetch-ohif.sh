#!/usr/bin/env bash
# Fetch the pinned OHIF viewer's static build once (npm pack @ohif/app, integrity checked, dist/ unpacked without
# source maps) into demo/.cache/ohif-<version>/dist, and print that folder. Idempotent: a second run only prints.
# Needs npm (it reads the npm registry, nothing else); no build step, nothing fetched by the viewer at run time.
set -euo pipefail
VERSION=3.13.2
INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
here=$(cd "$(dirname "$0")" && pwd)
cache=${PACSNODE_DEMO_CACHE:-$here/.cache}
dest=$cache/ohif-$VERSION/dist
if [ -f "$dest/index.html" ]; then echo "$dest"; exit 0; fi
command -v npm >/dev/null || { echo "fetch-ohif: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-ohif: npm pack @ohif/app@$VERSION (~50 MB, once)" >&2
(cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tarball=$tmp/ohif-app-$VERSION.tgz
got=$(node -e 'const c = require("crypto"), f = require("fs");
  console.log("sha512-" + c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tarball")
if [ "$got" != "$INTEGRITY" ]; then echo "fetch-ohif: integrity mismatch for @ohif/app@$VERSION: $got" >&2; exit 1; fi
tar -xzf "$tarball" -C "$tmp" --exclude='*.map' package/dist
mkdir -p "$(dirname "$dest")"
mv "$tmp/package/dist" "$dest"
echo "$dest"

#!/usr/bin/env bash
# Install the Debian packages the tests talk to (DCMTK, GDCM's gdcmscu, Orthanc + DICOMweb plugin, dicom3tools;
# chromium, node and npm for the OHIF viewer test; prometheus for promtool; systemd for systemd-analyze; postgresql for
# the database tests) when missing.
# Needs root for apt-get; otherwise says what is missing and leaves it to the tests to skip those peers.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v gdcmscu >/dev/null 2>&1 || need+=(libgdcm-tools)  # GDCM's gdcmscu, a second sender next to DCMTK
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # promtool checks deploy/prometheus-alerts.yml
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # systemd-analyze verifies deploy/pacsnode.service
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)  # the shared-database tests
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "sysdeps: missing ${need[*]} (run as root, or: sudo apt-get install ${need[*]}); tests needing them will skip" >&2
  exit 0
fi
echo "sysdeps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

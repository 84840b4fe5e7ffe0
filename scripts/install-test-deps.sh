#!/usr/bin/env bash
# Installs everything the test suite needs: Debian tools (dcmtk, Orthanc with its
# DICOMweb plugin, OpenJPH's command-line tools, strace and mkfs.ext4 for the disk
# fault tests, curl for the DICOMweb facade's vendor examples, HAProxy for the two-node
# test) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
for pkg in dcmtk orthanc orthanc-dicomweb openjph-tools strace e2fsprogs curl haproxy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -m pip install -q -e '.[test]'

#!/usr/bin/env bash
# Installs everything the test suite needs: Debian tools (dcmtk, Orthanc with its
# DICOMweb plugin, OpenJPH's command-line tools, strace and mkfs.ext4 for the disk
# fault tests, curl for the DICOMweb facade's vendor examples, HAProxy for the two-node test,
# rsyslog and its GnuTLS driver as the audit trail's syslog receiver, Prometheus to
# evaluate the shipped alerting rules against real gateways, tinyproxy as a hospital's
# egress proxy, chromium for the
# browser tests, npm to fetch OHIF Viewer 3) and the package with its test extras; then OHIF
# Viewer 3's prebuilt application (npm package @ohif/app), packed once into a cache so
# test runs never download it.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
for pkg in dcmtk orthanc orthanc-dicomweb openjph-tools strace e2fsprogs curl haproxy rsyslog rsyslog-gnutls prometheus tinyproxy chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -m pip install -q -e '.[test]'
OHIF_VERSION=$(sed -n 's/^OHIF_VERSION = "\(.*\)"$/\1/p' tests/support/ohif.py)
OHIF_DIR=/var/cache/dicom-gateway/ohif/$OHIF_VERSION
if [ ! -f "$OHIF_DIR/package/dist/index.html" ]; then
  $SUDO mkdir -p "$OHIF_DIR"
  tarball=$($SUDO npm pack --silent "@ohif/app@$OHIF_VERSION" --pack-destination "$OHIF_DIR")
  $SUDO tar -xzf "$OHIF_DIR/$tarball" -C "$OHIF_DIR"
  $SUDO rm -f "$OHIF_DIR/$tarball"
fi

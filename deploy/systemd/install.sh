#!/bin/sh
# Install the fedfer agent as a systemd service (run as root). Idempotent: running it again upgrades in place.
#
#   install.sh --assets DIR (--ifer EXPORT | --without-ifer) [--venv DIR]
#
#   --assets DIR     folder holding the model files, laid out like ../shared (models/mediapipe/...); each file
#                    is checked against its pinned SHA-256 and copied to $PREFIX/assets (FEDFER_ASSETS).
#                    Optional on an upgrade: what an earlier run installed is verified instead.
#   --ifer EXPORT    IFER export (f + g) made with `fedfer-agent train-ifer`; installed as
#                    $PREFIX/assets/models/ifer, and a new agent.toml names it (vision.ifer_model).
#   --without-ifer   no trained IFER head: the agent caches features but refuses personalize and join.
#   --venv DIR       use this existing virtual environment (fedfer already installed) instead of creating
#                    $PREFIX/venv and pip-installing the project into it.
#
# Paths (environment): PREFIX (default /opt/fedfer), CONF_DIR (/etc/fedfer), UNIT_DIR (/etc/systemd/system),
# SRC (project checkout, default: two levels above this script).
set -eu

PREFIX="${PREFIX:-/opt/fedfer}"
SRC="${SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
CONF_DIR="${CONF_DIR:-/etc/fedfer}"
SERVICE=fedfer-agent.service
# shellcheck source=../install-lib.sh
. "$SRC/deploy/install-lib.sh"
parse_args "$@"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi

# A dedicated system user without a login shell or home; in the video group for the camera.
if ! id fedfer >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedfer
fi
if getent group video >/dev/null 2>&1; then
    usermod --append --groups video fedfer
fi

install_venv

# Model files, verified (readable by the service, writable by root only).
install -d -m 0755 "$PREFIX" "$PREFIX/assets"
provision_models

install -d -m 0755 "$CONF_DIR"
write_config "$CONF_DIR/agent.toml" 0640 fedfer

install -d -m 0755 "$UNIT_DIR"
sed -e "s#/opt/fedfer/venv#$VENV#g" -e "s#/opt/fedfer#$PREFIX#g" -e "s#/etc/fedfer#$CONF_DIR#g" \
    "$SRC/deploy/systemd/$SERVICE" > "$UNIT_DIR/$SERVICE.tmp"
chmod 0644 "$UNIT_DIR/$SERVICE.tmp"
mv "$UNIT_DIR/$SERVICE.tmp" "$UNIT_DIR/$SERVICE"
systemd-analyze verify "$UNIT_DIR/$SERVICE"

systemctl daemon-reload
systemctl enable "$SERVICE"
systemctl restart "$SERVICE"
echo "fedfer-agent installed; check it with: systemctl status $SERVICE"

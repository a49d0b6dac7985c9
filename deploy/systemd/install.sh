#!/bin/sh
# Install the fedfer agent as a systemd service (run as root). Idempotent: running it again upgrades in place.
#   PREFIX   install prefix holding venv/ (default /opt/fedfer); the project is pip-installed into it.
#   SRC      project checkout to install from (default: two levels above this script).
set -eu

PREFIX="${PREFIX:-/opt/fedfer}"
SRC="${SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
CONF_DIR=/etc/fedfer
SERVICE=fedfer-agent.service

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

if [ ! -x "$PREFIX/venv/bin/python" ]; then
    python3 -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --upgrade "$SRC[agent]"

install -d -m 0755 "$CONF_DIR"
if [ ! -e "$CONF_DIR/agent.toml" ]; then
    # Every key with its secure default, documented; the operator sets [capture] and [federation].
    install -m 0640 -g fedfer "$SRC/deploy/agent.example.toml" "$CONF_DIR/agent.toml"
fi

sed "s#/opt/fedfer#$PREFIX#g" "$SRC/deploy/systemd/$SERVICE" > "$UNIT_DIR/$SERVICE.tmp"
chmod 0644 "$UNIT_DIR/$SERVICE.tmp"
mv "$UNIT_DIR/$SERVICE.tmp" "$UNIT_DIR/$SERVICE"
systemd-analyze verify "$UNIT_DIR/$SERVICE"

systemctl daemon-reload
systemctl enable "$SERVICE"
systemctl restart "$SERVICE"
echo "fedfer-agent installed; check it with: systemctl status $SERVICE"

#!/bin/sh
# Remove the fedfer agent service (run as root). Idempotent. Keeps /var/lib/fedfer-agent (the encrypted cache
# and device identity) and the configuration unless PURGE=1, which deletes them and with them every key that
# could read the cache. Paths as for install.sh: PREFIX, CONF_DIR, UNIT_DIR.
set -eu

PREFIX="${PREFIX:-/opt/fedfer}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
CONF_DIR="${CONF_DIR:-/etc/fedfer}"
SERVICE=fedfer-agent.service

if [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: run as root" >&2
    exit 1
fi

if [ -e "$UNIT_DIR/$SERVICE" ]; then
    systemctl disable --now "$SERVICE" || true
    rm -f "$UNIT_DIR/$SERVICE"
    systemctl daemon-reload
fi
rm -rf "$PREFIX/venv" "$PREFIX/assets"
if [ "${PURGE:-0}" = 1 ]; then
    rm -rf /var/lib/fedfer-agent "$CONF_DIR"
    if id fedfer >/dev/null 2>&1; then
        userdel fedfer
    fi
fi
echo "fedfer-agent removed"

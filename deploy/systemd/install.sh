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
ASSETS_SRC=""
IFER=""
WITHOUT_IFER=0
VENV=""

usage() {
    echo "usage: install.sh --assets DIR (--ifer EXPORT | --without-ifer) [--venv DIR]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --assets) [ $# -ge 2 ] || usage; ASSETS_SRC="$2"; shift 2 ;;
        --ifer) [ $# -ge 2 ] || usage; IFER="$2"; shift 2 ;;
        --without-ifer) WITHOUT_IFER=1; shift ;;
        --venv) [ $# -ge 2 ] || usage; VENV="$2"; shift 2 ;;
        *) usage ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi
if [ -n "$IFER" ] && [ "$WITHOUT_IFER" = 1 ]; then
    usage
fi
if [ -z "$ASSETS_SRC" ] && [ ! -d "$PREFIX/assets/models" ]; then
    echo "install.sh: the first install needs --assets DIR (the model files) and --ifer EXPORT or --without-ifer" >&2
    exit 2
fi
if [ -n "$ASSETS_SRC" ] && [ -z "$IFER" ] && [ "$WITHOUT_IFER" = 0 ]; then
    echo "install.sh: give --ifer EXPORT (a trained IFER head, from fedfer-agent train-ifer) or --without-ifer" >&2
    exit 2
fi

# A dedicated system user without a login shell or home; in the video group for the camera.
if ! id fedfer >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedfer
fi
if getent group video >/dev/null 2>&1; then
    usermod --append --groups video fedfer
fi

if [ -n "$VENV" ]; then
    if [ ! -x "$VENV/bin/fedfer-agent" ]; then
        echo "install.sh: $VENV has no fedfer-agent (install the project into it first)" >&2
        exit 1
    fi
else
    VENV="$PREFIX/venv"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --upgrade "$SRC[agent]"
fi

# Model files, verified (readable by the service, writable by root only).
install -d -m 0755 "$PREFIX" "$PREFIX/assets"
if [ -n "$ASSETS_SRC" ]; then
    if [ -n "$IFER" ]; then
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --ifer "$IFER"
    else
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --without-ifer
    fi
else
    "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --check
fi

install -d -m 0755 "$CONF_DIR"
if [ ! -e "$CONF_DIR/agent.toml" ]; then
    # Every key with its secure default, documented; the operator sets [capture] and [federation].
    if [ -d "$PREFIX/assets/models/ifer" ]; then
        sed 's#^ifer_model = ""  #ifer_model = "models/ifer"#' "$SRC/deploy/agent.example.toml" > "$CONF_DIR/agent.toml.tmp"
    else
        cp "$SRC/deploy/agent.example.toml" "$CONF_DIR/agent.toml.tmp"
    fi
    chmod 0640 "$CONF_DIR/agent.toml.tmp"
    chgrp fedfer "$CONF_DIR/agent.toml.tmp"
    mv "$CONF_DIR/agent.toml.tmp" "$CONF_DIR/agent.toml"
elif [ -d "$PREFIX/assets/models/ifer" ] && grep -q '^ifer_model = ""' "$CONF_DIR/agent.toml"; then
    echo "install.sh: warning: $CONF_DIR/agent.toml has no vision.ifer_model; set ifer_model = \"models/ifer\"" >&2
fi

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

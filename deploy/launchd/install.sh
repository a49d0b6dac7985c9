#!/bin/sh
# Install the fedfer agent as a per-user LaunchAgent (macOS; run as the user, not root). Idempotent.
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
# Paths (environment): PREFIX (default ~/Library/Application Support/fedfer/app), SRC (project checkout,
# default: two levels above this script).
set -eu

LABEL=org.fedfer.agent
SUPPORT="$HOME/Library/Application Support/fedfer"
PREFIX="${PREFIX:-$SUPPORT/app}"
SRC="${SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
AGENTS="$HOME/Library/LaunchAgents"
PLIST="$AGENTS/$LABEL.plist"
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

if [ "$(id -u)" -eq 0 ]; then
    echo "install.sh: run as the user whose camera the agent uses, not as root" >&2
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

mkdir -p "$AGENTS" "$HOME/Library/Logs/fedfer"
mkdir -p "$SUPPORT/state" "$PREFIX"
chmod 0700 "$SUPPORT" "$SUPPORT/state"
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

# Model files, verified.
if [ -n "$ASSETS_SRC" ]; then
    if [ -n "$IFER" ]; then
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --ifer "$IFER"
    else
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --without-ifer
    fi
else
    "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --check
fi

if [ ! -e "$SUPPORT/agent.toml" ]; then
    if [ -d "$PREFIX/assets/models/ifer" ]; then
        sed 's#^ifer_model = ""  #ifer_model = "models/ifer"#' "$SRC/deploy/agent.example.toml" > "$SUPPORT/agent.toml.tmp"
    else
        cp "$SRC/deploy/agent.example.toml" "$SUPPORT/agent.toml.tmp"
    fi
    chmod 0600 "$SUPPORT/agent.toml.tmp"
    mv "$SUPPORT/agent.toml.tmp" "$SUPPORT/agent.toml"
elif [ -d "$PREFIX/assets/models/ifer" ] && grep -q '^ifer_model = ""' "$SUPPORT/agent.toml"; then
    echo "install.sh: warning: $SUPPORT/agent.toml has no vision.ifer_model; set ifer_model = \"models/ifer\"" >&2
fi

sed -e "s#__PREFIX__/venv#$VENV#g" -e "s#__PREFIX__#$PREFIX#g" -e "s#__HOME__#$HOME#g" \
    "$SRC/deploy/launchd/$LABEL.plist" > "$PLIST.tmp"
plutil -lint "$PLIST.tmp" >/dev/null
mv "$PLIST.tmp" "$PLIST"

# bootout fails when the agent is not loaded yet; that is fine.
launchctl bootout "gui/$(id -u)/$LABEL" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$PLIST"
echo "fedfer agent installed; check it with: launchctl print gui/$(id -u)/$LABEL"

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
# shellcheck source=../install-lib.sh
. "$SRC/deploy/install-lib.sh"
parse_args "$@"

if [ "$(id -u)" -eq 0 ]; then
    echo "install.sh: run as the user whose camera the agent uses, not as root" >&2
    exit 1
fi

mkdir -p "$AGENTS" "$HOME/Library/Logs/fedfer"
mkdir -p "$SUPPORT/state" "$PREFIX"
chmod 0700 "$SUPPORT" "$SUPPORT/state"
install_venv
provision_models  # verified model files
write_config "$SUPPORT/agent.toml" 0600

sed -e "s#__PREFIX__/venv#$VENV#g" -e "s#__PREFIX__#$PREFIX#g" -e "s#__HOME__#$HOME#g" \
    "$SRC/deploy/launchd/$LABEL.plist" > "$PLIST.tmp"
plutil -lint "$PLIST.tmp" >/dev/null
mv "$PLIST.tmp" "$PLIST"

# bootout fails when the agent is not loaded yet; that is fine.
launchctl bootout "gui/$(id -u)/$LABEL" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$PLIST"
echo "fedfer agent installed; check it with: launchctl print gui/$(id -u)/$LABEL"

#!/bin/sh
# Install the fedfer agent as a per-user LaunchAgent (macOS; run as the user, not root). Idempotent.
#   PREFIX   where the venv goes (default ~/Library/Application Support/fedfer/app)
#   SRC      project checkout to install from (default: two levels above this script)
set -eu

LABEL=org.fedfer.agent
SUPPORT="$HOME/Library/Application Support/fedfer"
PREFIX="${PREFIX:-$SUPPORT/app}"
SRC="${SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
AGENTS="$HOME/Library/LaunchAgents"
PLIST="$AGENTS/$LABEL.plist"

if [ "$(id -u)" -eq 0 ]; then
    echo "install.sh: run as the user whose camera the agent uses, not as root" >&2
    exit 1
fi

mkdir -p "$AGENTS" "$HOME/Library/Logs/fedfer"
mkdir -p "$SUPPORT/state"
chmod 0700 "$SUPPORT" "$SUPPORT/state"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    python3 -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --upgrade "$SRC[agent]"
if [ ! -e "$SUPPORT/agent.toml" ]; then
    cp "$SRC/deploy/agent.example.toml" "$SUPPORT/agent.toml"
    chmod 0600 "$SUPPORT/agent.toml"
fi

sed -e "s#__PREFIX__#$PREFIX#g" -e "s#__HOME__#$HOME#g" "$SRC/deploy/launchd/$LABEL.plist" > "$PLIST.tmp"
plutil -lint "$PLIST.tmp" >/dev/null
mv "$PLIST.tmp" "$PLIST"

# bootout fails when the agent is not loaded yet; that is fine.
launchctl bootout "gui/$(id -u)/$LABEL" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$PLIST"
echo "fedfer agent installed; check it with: launchctl print gui/$(id -u)/$LABEL"

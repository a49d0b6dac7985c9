#!/bin/sh
# Remove the fedfer LaunchAgent (macOS; run as the user). Idempotent. Keeps the state folder (encrypted cache,
# device identity) unless PURGE=1, which deletes it and with it every key that could read the cache.
set -eu

LABEL=org.fedfer.agent
SUPPORT="$HOME/Library/Application Support/fedfer"
PREFIX="${PREFIX:-$SUPPORT/app}"
PLIST="$HOME/Library/LaunchAgents/$LABEL.plist"

launchctl bootout "gui/$(id -u)/$LABEL" 2>/dev/null || true
rm -f "$PLIST"
rm -rf "$PREFIX"
if [ "${PURGE:-0}" = 1 ]; then
    rm -rf "$SUPPORT" "$HOME/Library/Logs/fedfer"
fi
echo "fedfer agent removed"

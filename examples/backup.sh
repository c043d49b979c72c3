#!/bin/bash
# Back up a directory into a dated, compressed archive and keep the last seven.
set -euo pipefail

SRC_DIR="${1:-$HOME/projects}"
DEST_DIR="${2:-/var/backups/projects}"
KEEP=7

if [ ! -d "$SRC_DIR" ]; then
    echo "error: $SRC_DIR is not a directory" >&2
    exit 1

mkdir -p "$DEST_DIR"
archive="$DEST_DIR/$(basename "$SRC_DIR")-$(date +%Y%m%d-%H%M%S).tar.gz"
tar -czf "$archive" -C "$(dirname "$SRC_DIR")" "$(basename "$SRC_DIR")"
echo "created $archive"

# remove all but the newest $KEEP archives
ls -1t "$DEST_DIR"/*.tar.gz | tail -n +$((KEEP + 1)) | xargs -r rm --

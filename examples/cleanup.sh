#!/usr/bin/env bash
# Delete log files older than a number of days (default 14).
days="${1:-14}"
log_dir=/var/log/myapp

case "$days" in
    ''|*[!0-9]*)
        echo "usage: $0 [DAYS]" >&2
        exit 2
        ;;
esac

find "$log_dir" -name '*.log' -mtime +"$days" -print -delete

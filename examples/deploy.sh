#!/bin/sh
# Deploy the current build to a list of hosts over ssh.
set -e

HOSTS="web1 web2 web3"
BUILD=dist/app.tar.gz

[ -f "$BUILD" ] || { echo "no build at $BUILD" >&2; exit 1; }

for host in $HOSTS; do
    echo "deploying to $host"
    
done

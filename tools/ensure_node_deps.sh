#!/usr/bin/env bash
# The npm packages of the SMART App Launch tests (tests/support/oidc/): oidc-provider, the local OpenID
# Connect provider standing in for ID-porten and HelseID, and fhirclient, the official SMART JS client.
# `make test` runs this; it installs them from package-lock.json (npm ci) when node_modules is missing or
# older than the lock file. Optional dependencies (fhirclient's React Native crypto shims) are left out:
# the tests use fhirclient's browser build only.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/support/oidc" && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "ensure_node_deps: node and npm are missing: install Node.js 20.19+ (Debian: apt-get install -y nodejs npm)" >&2
    echo "ensure_node_deps: (the SMART launch tests skip without them, and fail under FHIR_NORSE_REQUIRE_BROWSER=1)" >&2
    if [ "${FHIR_NORSE_REQUIRE_BROWSER:-}" = "1" ]; then
        exit 1
    fi
    exit 0
fi
STAMP="${DIR}/node_modules/.package-lock.json"
if [ -f "${STAMP}" ] && [ ! "${DIR}/package-lock.json" -nt "${STAMP}" ]; then
    exit 0
fi
echo "ensure_node_deps: installing the npm packages of ${DIR}"
cd "${DIR}"
npm ci --no-audit --no-fund --omit=optional --ignore-scripts --loglevel=error

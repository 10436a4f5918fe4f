#!/usr/bin/env bash
# Debian's chromium for the browser tests of the patient form (tests/web/): Playwright drives it at
# /usr/bin/chromium instead of downloading a browser of its own. `make test` runs this; it installs
# the package when it is missing (as root, or through sudo), and says what to do otherwise.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "${CHROMIUM}" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: ${CHROMIUM} is missing and this is not a Debian system: install Chromium" >&2
    echo "ensure_chromium: (the browser tests skip without it, and fail under FHIR_NORSE_REQUIRE_BROWSER=1)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: run 'apt-get install -y chromium' as root (the browser tests need it)" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing Debian's chromium for the browser tests"
export DEBIAN_FRONTEND=noninteractive
${SUDO} apt-get install -y -q chromium >/dev/null || { ${SUDO} apt-get update -q >/dev/null && ${SUDO} apt-get install -y -q chromium >/dev/null; }

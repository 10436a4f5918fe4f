#!/usr/bin/env bash
# Debian packages the server and its tests use beyond Python: Pango and a font for WeasyPrint (the feedback
# report's PDF), and, with "test", poppler-utils (the tests read the PDF back with pdftotext and render it
# with pdftoppm). Installed when missing (as root, or through sudo); otherwise says what to install.
# Usage: tools/ensure_debian_packages.sh [serve|test]
set -euo pipefail
PACKAGES=(libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core)
if [ "${1:-serve}" = "test" ]; then
    PACKAGES+=(poppler-utils)
fi
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q "install ok installed" || missing+=("${package}")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_debian_packages: install ${missing[*]} (or your system's equivalents)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_debian_packages: run 'apt-get install -y ${missing[*]}' as root" >&2
        exit 0
    fi
fi
echo "ensure_debian_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
${SUDO} apt-get install -y -q "${missing[@]}" >/dev/null \
    || { ${SUDO} apt-get update -q >/dev/null && ${SUDO} apt-get install -y -q "${missing[@]}" >/dev/null; }

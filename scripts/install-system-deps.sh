#!/usr/bin/env bash
# System packages the C++ backend (libqaengine, engine._C) builds against: nlohmann-json, utf8proc, GoogleTest.
# Installs them with apt-get when running as root on a Debian/Ubuntu system and they are missing; otherwise prints a
# one-line notice and exits 0 (the C++ backend is optional; setup.py then installs the pure-Python package).
set -u

packages=(nlohmann-json3-dev libutf8proc-dev libgtest-dev)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
else
  echo "notice: no dpkg on this system; install ${packages[*]} (or equivalents) yourself for the C++ backend"
  exit 0
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "notice: missing ${missing[*]} (not root or no apt-get); the C++ backend will not build"
  exit 0
fi
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    >/dev/null 2>&1; then
  echo "notice: apt-get could not install ${missing[*]}; the C++ backend will not build"
fi
exit 0

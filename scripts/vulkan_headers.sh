#!/usr/bin/env bash
# Newer Vulkan headers for a Debian 12 machine, without touching the system.
# llama.cpp (llama-cpp-python 0.3.36) needs Vulkan headers >= 1.3.255; Debian 12 ships 1.3.239.
# This unpacks Debian 13's libvulkan-dev and spirv-headers (dpkg -x) into a cache folder, using
# apt itself with a private state folder and the Debian mirror already named in this machine's
# apt sources. Prints the include folder on stdout; messages go to stderr.
# Usage: scripts/vulkan_headers.sh [CACHE_DIR]   (default ~/.cache/localllm-vulkan)
set -euo pipefail

CACHE="${1:-${LOCALLLM_VULKAN_CACHE:-$HOME/.cache/localllm-vulkan}}"
SUITE="${LOCALLLM_VULKAN_SUITE:-trixie}"
PKGS="libvulkan-dev spirv-headers"
say() { printf 'localllm: %s\n' "$*" >&2; }

if [ -f "$CACHE/usr/include/vulkan/vulkan_core.h" ] && [ -d "$CACHE/usr/include/spirv" ]; then
  echo "$CACHE/usr/include"; exit 0
fi
for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null 2>&1 || { say "$0 needs $tool (Debian/Ubuntu only)."; exit 1; }
done

# the Debian mirror this machine already uses: a deb822 URIs: line or a one-line "deb URI suite" entry
mirror_uri() {
  local f
  # shellcheck disable=SC2086
  for f in ${LOCALLLM_APT_SOURCES:-/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list}; do
    [ -f "$f" ] || continue
    awk '
      /^[[:space:]]*URIs:/ { u = $2 }
      /^[[:space:]]*Suites:/ && u != "" { for (i = 2; i <= NF; i++) if ($i !~ /-/) { print u; exit } }
      /^[[:space:]]*$/ { u = "" }
      /^deb[[:space:]]/ { n = 2; if ($2 ~ /^\[/) { while ($n !~ /\]$/) n++; n++ } \
                          if ($(n + 1) !~ /-/ && $(n + 2) ~ /main/) { print $n; exit } }
    ' "$f" | grep -m1 -E '/debian/?$' && return 0
  done
  return 1
}

uri="$(mirror_uri)" || { say "no Debian mirror found in /etc/apt/sources.list*; set up apt first."; exit 1; }
work="$CACHE.apt"
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs" "$CACHE"
printf 'deb %s %s main\n' "${uri%/}" "$SUITE" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
          -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "Debug::NoLocking=1"
          -o "APT::Sandbox::User=root")
say "fetching Debian $SUITE's $PKGS from $uri into $CACHE (the system's packages are not touched)"
apt-get -q "${apt_opts[@]}" update >&2
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get -q "${apt_opts[@]}" download $PKGS >&2)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$CACHE"; done
find "$CACHE" -xtype l -delete   # libvulkan.so -> the loader, which stays the system's
grep -m1 -E 'VK_HEADER_VERSION [0-9]+' "$CACHE/usr/include/vulkan/vulkan_core.h" >&2
echo "$CACHE/usr/include"

#!/usr/bin/env bash
# scripts/vendor_js.sh: fetch the chat page's two libraries from the npm registry (pinned) into
# localllm/static/vendor/, with their licenses. The page inlines them: no CDN, nothing from outside.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/localllm/static/vendor"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack marked@18.2.1 dompurify@3.4.18 --silent >/dev/null
mkdir -p m d "$out"
tar xzf marked-18.2.1.tgz -C m
tar xzf dompurify-3.4.18.tgz -C d
cp m/package/lib/marked.umd.js "$out/marked.umd.js"
cp m/package/LICENSE "$out/marked.LICENSE"
cp d/package/dist/purify.min.js "$out/purify.min.js"
cp d/package/LICENSE "$out/dompurify.LICENSE"
sha256sum "$out"/*.js

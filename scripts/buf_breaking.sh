#!/usr/bin/env bash
# `make buf-breaking`: the protos must stay wire- and source-compatible with what main
# has published. Compares with the merge base of HEAD and main (origin/main, else a local
# main); on main itself, with the commit before HEAD.
#
# A shallow clone lacks the history to compare against: that is reported, and under
# CI=true it fails, so a check that compared nothing never passes there (.ci/run
# unshallows first). A repository whose first commit is HEAD has published nothing yet.
set -euo pipefail

head=$(git rev-parse HEAD)
base=""
for ref in origin/main main; do
  if git rev-parse -q --verify "$ref^{commit}" >/dev/null; then
    base=$(git merge-base HEAD "$ref" 2>/dev/null || true)
    [ -n "$base" ] && break
  fi
done
if [ -z "$base" ] || [ "$base" = "$head" ]; then
  # On main (or no main known): what came before HEAD is what was published.
  base=$(git rev-parse -q --verify "HEAD~1^{commit}" || true)
fi

if [ -z "$base" ]; then
  # No commit before HEAD here: either HEAD is the very first one (nothing was published
  # to break), or the clone is shallow and the history is missing.
  if [ "$(git rev-parse --is-shallow-repository)" = "false" ]; then
    echo "buf breaking: HEAD is the first commit; no published contract to compare with"
    exit 0
  fi
  reason="buf breaking: shallow clone, no earlier commit of main to compare the protos with"
  if [ "${CI:-}" = "true" ]; then
    echo "$reason; run: git fetch --unshallow origin" >&2
    exit 1
  fi
  echo "$reason; not checked (under CI=true this fails)"
  exit 0
fi

echo "buf breaking: protos against $(git log -1 --format='%h (%s)' "$base")"
exec npx --no-install buf breaking --against ".git#ref=$base"

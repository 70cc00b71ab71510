#!/usr/bin/env bash
# Builds the release images from the Dockerfile, tagged with the workspace version (which must
# be the chart's appVersion, the tag the chart and the DedupPipeline default to):
#   $REGISTRY/dedup:<version>            all three binaries (what the chart runs)
#   $REGISTRY/ingest:<version>, $REGISTRY/dedup-worker:<version>, $REGISTRY/dedup-operator:<version>
#                                        one binary each, with its own entrypoint and health check
#
#   REGISTRY=ghcr.io/acme scripts/release-image.sh          # build
#   REGISTRY=ghcr.io/acme scripts/release-image.sh --push   # build and push
#
# BUILDER: the build command (default docker; `podman` works too). BUILD_OPTS: more options
# for it, e.g. --build-arg BUILD_IMAGE=<mirror>/rust:1.95-bookworm --build-arg
# RUNTIME_IMAGE=<mirror>/distroless/cc-debian12:nonroot. TARGETS: which images (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
registry=${REGISTRY:-dedup}
read -ra builder <<<"${BUILDER:-docker}"
read -ra opts <<<"${BUILD_OPTS:-}"
read -ra targets <<<"${TARGETS:-dedup ingest dedup-worker dedup-operator}"
push=false
case ${1:-} in
  --push) push=true ;;
  "") ;;
  *) echo "usage: REGISTRY=<registry> $0 [--push]" >&2; exit 2 ;;
esac

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
chart_version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/dedup/Chart.yaml)
if [[ -z $version || $version != "$chart_version" ]]; then
  echo "the workspace version ($version) is not the chart's appVersion ($chart_version): set both" >&2
  exit 1
fi
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

for target in "${targets[@]}"; do
  image=$registry/$target:$version
  echo "building $image (target $target)" >&2
  "${builder[@]}" build --target "$target" -t "$image" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$revision" \
    "${opts[@]}" .
  if $push; then "${builder[@]}" push "$image"; fi
  echo "$image"
done

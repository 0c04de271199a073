#!/usr/bin/env bash
# Checks deploy/ as far as a machine without a cluster or a container engine can:
#   1. the Kubernetes manifests, each file and the kustomization as rendered (when kubectl
#      is installed), against the official JSON schemas of Kubernetes 1.30 and 1.37 in
#      strict mode (unknown fields refused), with kubernetes-validate from PyPI, which
#      ships the schemas and works offline;
#   2. the systemd units with `systemd-analyze verify`, their ExecStart pointed at the
#      binary built in step 3, any warning counted as a failure;
#   3. the image's build step: deploy/build.sh, which deploy/Dockerfile runs, here with
#      the dev profile and the workspace's target (FERRY_PROFILE=release builds as the
#      image does).
# The configs under deploy/ are parsed by ferry-cli's unit tests (`deploy_configs_parse`).
# Not part of scripts/test.sh: step 3 builds ferry-cli with its own feature set, minutes
# on top of the suite; run it when deploy/, the Dockerfile or ferry-cli's features change.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv-tool.sh
validate=$(venv_tool kubernetes-validate 1.37.0)

echo "check-deploy: Kubernetes manifests"
manifests=(deploy/kubernetes/namespace.yaml deploy/kubernetes/secret.yaml
  deploy/kubernetes/relay.yaml deploy/kubernetes/serve.yaml)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/kubernetes >"$tmp/rendered.yaml"
  manifests+=("$tmp/rendered.yaml")
else
  echo "check-deploy: kubectl not installed, the kustomization is not rendered"
fi
for version in 1.30.0 1.37.0; do
  "$validate" --strict --quiet -k "$version" "${manifests[@]}"
done

echo "check-deploy: the image's build step (deploy/build.sh)"
binary=$(FERRY_PROFILE=${FERRY_PROFILE:-dev} deploy/build.sh)
[[ $binary == /* ]] || binary=$PWD/$binary
"$binary" --version

echo "check-deploy: systemd units"
if command -v systemd-analyze >/dev/null; then
  for unit in deploy/systemd/*.service; do
    sed "s|/usr/local/bin/ferry|$binary|g" "$unit" >"$tmp/$(basename "$unit")"
  done
  report=$(systemd-analyze verify "$tmp"/*.service 2>&1) || { echo "$report"; exit 1; }
  if [ -n "$report" ]; then
    echo "$report"
    echo "check-deploy: systemd-analyze verify warned" >&2
    exit 1
  fi
else
  echo "check-deploy: systemd-analyze not installed, units not verified"
fi

echo "check-deploy: all checks passed"

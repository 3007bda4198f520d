#!/usr/bin/env bash
# Validates everything under deploy/ offline:
#   - every Kubernetes object against the Kubernetes OpenAPI schemas (PyPI package
#     kubernetes-validate, strict: unknown fields are errors), as kustomize renders them
#     (the base and the base + privileged component) when kubectl is available, and
#     file by file otherwise;
#   - the rules the API server enforces that a schema cannot express (Bidirectional
#     mount propagation only in privileged containers), and that the grace period is
#     longer than the config's drain deadline;
#   - the DaemonSet's sluice.io/config-checksum annotation matches deploy/config/;
#   - deploy/grafana-dashboard.json is JSON.
#
#   scripts/validate-manifests.sh                    # check (CI)
#   scripts/validate-manifests.sh --update-checksum  # rewrite the annotation, then check
#
# The validator is installed once into a venv under target/ (override with
# $SLUICE_VALIDATE_VENV); later runs only check it and take a few seconds.
set -euo pipefail

KV_VERSION=1.37.0
# Validated against the oldest Kubernetes release sluice supports and the newest the
# validator knows (the DaemonSet uses nothing newer than 1.29).
K8S_VERSIONS=(1.29.0 1.37.0)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deploy="$root/deploy"
venv="${SLUICE_VALIDATE_VENV:-$root/target/validate-venv}"
work="$root/target/validate-manifests"

say() { printf 'validate-manifests: %s\n' "$*" >&2; }
die() { printf 'validate-manifests: error: %s\n' "$*" >&2; exit 1; }

update_checksum=0
for arg in "$@"; do
  case "$arg" in
    --update-checksum) update_checksum=1 ;;
    *) die "unknown argument '$arg' (expected --update-checksum)" ;;
  esac
done

command -v python3 >/dev/null || die "python3 not found (apt-get install python3 python3-venv)"

# --- the validator, cached --------------------------------------------------------------
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KV_VERSION"; then
  say "installing kubernetes-validate $KV_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
    || die "pip install kubernetes-validate==$KV_VERSION failed"
fi
py="$venv/bin/python"

# --- the config checksum annotation ---------------------------------------------------
checksum="sha256:$(cat "$deploy/config/sluice.toml" "$deploy/config/routes.toml" | sha256sum | cut -d' ' -f1)"
annotation_re='^( *sluice\.io/config-checksum: ).*$'
if [ "$update_checksum" = 1 ]; then
  sed -E -i "s|$annotation_re|\1\"$checksum\"|" "$deploy/daemonset.yaml"
  say "config checksum set to $checksum"
fi
current="$(sed -nE 's|^ *sluice\.io/config-checksum: *"?([^"]*)"?$|\1|p' "$deploy/daemonset.yaml")"
[ -n "$current" ] || die "deploy/daemonset.yaml has no sluice.io/config-checksum annotation"
if [ "$current" != "$checksum" ]; then
  die "deploy/daemonset.yaml sluice.io/config-checksum is $current but deploy/config/ hashes to $checksum: run scripts/validate-manifests.sh --update-checksum"
fi

# --- render -------------------------------------------------------------------------
rm -rf "$work"
mkdir -p "$work/privileged"
rendered=()
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  kubectl kustomize "$deploy" >"$work/base.yaml" || die "kubectl kustomize deploy/ failed"
  # The privileged component on top of the base, from a kustomization outside deploy/
  # (kustomize refuses a root that contains the including directory).
  rel="$(realpath --relative-to="$work/privileged" "$deploy")"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\ncomponents: [%s/components/privileged]\n' \
    "$rel" "$rel" >"$work/privileged/kustomization.yaml"
  kubectl kustomize "$work/privileged" >"$work/privileged.yaml" \
    || die "kubectl kustomize with components/privileged failed"
  rendered=("$work/base.yaml" "$work/privileged.yaml")
  say "rendered deploy/ with kubectl kustomize (base and privileged)"
else
  say "kubectl not found: validating deploy/*.yaml file by file (ConfigMap not rendered)"
  for f in "$deploy"/*.yaml; do
    case "$(basename "$f")" in kustomization.yaml) continue ;; esac
    rendered+=("$f")
  done
fi

# --- schema validation --------------------------------------------------------------
for v in "${K8S_VERSIONS[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${rendered[@]}" \
    || die "schema validation failed against Kubernetes $v"
done
say "schemas ok (Kubernetes ${K8S_VERSIONS[*]}, strict): ${rendered[*]#"$root/"}"

# --- what the API server enforces beyond the schema, the dashboard and the config ------
"$py" - "$deploy/config/sluice.toml" "$deploy/grafana-dashboard.json" "${rendered[@]}" <<'EOF' || die "semantic checks failed"
import json, re, sys, tomllib, yaml

config, dashboard, files = sys.argv[1], sys.argv[2], sys.argv[3:]
errors = []
with open(config, "rb") as f:
    drain = tomllib.load(f).get("timeouts", {}).get("drain", "30s")
m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", str(drain))
drain_s = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"] if m else None
if drain_s is None:
    errors.append(f"{config}: timeouts.drain {drain!r} is not a duration")
with open(dashboard) as f:
    try:
        d = json.load(f)
        if not d.get("panels"):
            errors.append(f"{dashboard}: no panels")
    except ValueError as e:
        errors.append(f"{dashboard}: not JSON: {e}")
kinds = set()
for path in files:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            kinds.add(doc.get("kind"))
            spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                sc = c.get("securityContext") or {}
                for m in c.get("volumeMounts", []):
                    if m.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
                        errors.append(f"{path}: {doc['kind']}/{doc['metadata']['name']} container "
                                      f"{c['name']}: Bidirectional mount propagation on {m['mountPath']} "
                                      "is only admitted for privileged containers")
            if doc.get("kind") == "DaemonSet" and drain_s is not None:
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if grace <= drain_s:
                    errors.append(f"{path}: terminationGracePeriodSeconds {grace} is not longer "
                                  f"than the drain deadline (timeouts.drain = {drain})")
for e in errors:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF

say "ok"

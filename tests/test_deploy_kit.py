"""The Kubernetes kit under deploy/: both overlays render (a Python render of the kustomize
features the kit uses, compared with `kubectl kustomize` where installed) and pass the Pod
Security "restricted" profile, shutdown timing matches the gateway's drain, the admin port
is closed to all but monitoring, and the alerts and the dashboard name metrics a real
gateway exports."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.settings import Settings
from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "deploy" / "kubernetes"
OVERLAYS = ("edge", "sidecar")
DASHBOARD = REPO / "deploy" / "grafana" / "model-gateway.json"
#: Metrics the kit names before the gateway exports them, and the work that will.
PENDING_METRICS: dict[str, str] = {}

# --- a render of the kustomize features the kit uses -----------------------------------------

#: Strategic-merge keys of the lists the kit patches (others are replaced whole).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into `base`: maps merge key by key, lists of `MERGE_KEYS`
    merge item by item on their key (new items first, as kustomize puts them), other lists
    and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_patch = {p[key]: p for p in patch}
        existing = {b[key] for b in base}
        new = [copy.deepcopy(p) for p in patch if p[key] not in existing]
        return new + [merge(b, by_patch[b[key]]) if b[key] in by_patch else copy.deepcopy(b)
                      for b in base]
    return copy.deepcopy(patch)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects of the kustomization in `folder`: its resources (files, or folders with
    a kustomization), its strategic-merge patches (by file, matched on kind and name) and its
    labels (metadata.labels only). Anything else in a kustomization is refused."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "patches", "labels"}
    assert not unknown, f"{folder}: the render does not implement {sorted(unknown)}"
    objs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = folder / res
        if path.is_dir():
            objs += render(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only file patches are rendered"
        doc = yaml.safe_load((folder / patch["path"]).read_text())
        [i] = [i for i, o in enumerate(objs) if o["kind"] == doc["kind"]
               and o["metadata"]["name"] == doc["metadata"]["name"]]
        objs[i] = merge(objs[i], doc)
    for group in kust.get("labels", []):
        assert set(group) == {"pairs"}, f"{folder}: labels apply to metadata only"
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    return objs


def canonical(value: Any) -> Any:
    """`value` with lists of named items sorted by name (kustomize's order of a merged list
    is not part of its meaning)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: v["name"])
        return items
    return value


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render(KIT / "overlays" / overlay)


def _gateway_config(objs: list[dict[str, Any]]) -> Settings:
    [cm] = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "model-gateway"]
    return Settings.model_validate(yaml.safe_load(cm["data"]["gateway.yaml"]))


def _pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [dep] = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == "model-gateway"]
    spec: dict[str, Any] = dep["spec"]["template"]["spec"]
    return spec


# --- the render --------------------------------------------------------------------------------

def test_merge_follows_strategic_merge_for_named_lists() -> None:
    """A patch's container merges into the base container of its name, a new container is
    added, maps merge key by key and an unkeyed list is replaced."""
    base: dict[str, Any] = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}],
                     "tags": [1, 2]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["2"]}, {"name": "b"}],
                      "tags": [3]}}
    out = merge(base, patch)
    assert out["spec"]["containers"] == [{"name": "b"},
                                         {"name": "a", "image": "x", "args": ["2"]}]
    assert out["spec"]["tags"] == [3]
    assert base["spec"]["containers"][0]["args"] == ["1"]  # the base is not changed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_render_matches_kubectl_kustomize(overlay: str) -> None:
    """The Python render of each overlay equals `kubectl kustomize`'s output (where kubectl
    is installed; elsewhere the Python render alone holds every kind the kit ships)."""
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= kinds
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    done = subprocess.run([kubectl, "kustomize", str(KIT / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d]

    def index(items: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        return {(o["kind"], o["metadata"]["name"]): canonical(o) for o in items}

    assert index(objs) == index(theirs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_rendered(overlay: str) -> None:
    """No overlay renders a Secret (they are created once, out of band: re-applying the kit
    never overwrites them and the real values are never in git), and the pod names the two
    Secrets secret.example.yaml shows."""
    objs = rendered(overlay)
    assert by_kind(objs, "Secret") == []
    text = json.dumps(_pod(objs))
    example = {d["metadata"]["name"] for d in
               yaml.safe_load_all((KIT / "secret.example.yaml").read_text())}
    assert example == {"model-gateway", "maxmind"}
    for name in example:
        assert f'"name": "{name}"' in text


# --- Pod Security "restricted" -----------------------------------------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in `pod` breaks the Pod Security Standards "restricted" profile (baseline
    included), plus the kit's own rule: a read-only root filesystem everywhere."""
    out: list[str] = []
    psc = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            out.append(f"pod: {host}")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {vol['name']}: {sorted(kinds - ALLOWED_VOLUMES)}")
    if psc.get("sysctls"):
        out.append("pod: sysctls")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    containers = pod.get("initContainers", []) + pod["containers"] + pod.get(
        "ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities add {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if sc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t",
                                                             "container_init_t",
                                                             "container_kvm_t"):
            out.append(f"{name}: seLinuxOptions type")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem not read-only")
    return out


def test_the_restricted_check_catches_each_field() -> None:
    """The restricted check names a privileged container, a missing drop ALL, root, an
    unconfined seccomp profile, a hostPath volume and a writable root filesystem."""
    pod = _pod(rendered("edge"))
    assert restricted_violations(pod) == []
    bad = copy.deepcopy(pod)
    gw = bad["containers"][0]["securityContext"]
    gw.update(privileged=True, runAsUser=0, seccompProfile={"type": "Unconfined"},
              readOnlyRootFilesystem=False, capabilities={"drop": []})
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = "\n".join(restricted_violations(bad))
    for what in ("privileged", "drop ALL", "runAsUser 0", "seccompProfile Unconfined",
                 "hostPath", "not read-only"):
        assert what in found, found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(overlay: str) -> None:
    """Every pod template of the overlay (gateway, geoipupdate, the app, Redis) meets the
    restricted profile with a read-only root filesystem, and mounts no service account
    token."""
    deployments = by_kind(rendered(overlay), "Deployment")
    assert deployments
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], dep["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False


# --- shutdown, probes, geo -------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prestop_and_grace_cover_the_gateways_drain(overlay: str) -> None:
    """terminationGracePeriodSeconds is at least the preStop sleep + shutdown_drain_s +
    shutdown_grace_s + 1 of the ConfigMap's gateway.yaml (and of config/gateway.yaml's
    defaults), so the gateway finishes its drain before the kubelet kills it."""
    objs = rendered(overlay)
    pod = _pod(objs)
    [gw] = [c for c in pod["containers"] if c["name"] == "gateway"]
    command = gw["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    shipped = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    for drain, grace in ((_gateway_config(objs).shutdown_drain_s,
                          _gateway_config(objs).shutdown_grace_s),
                         (shipped["shutdown_drain_s"], shipped["shutdown_grace_s"])):
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_healthz_and_readyz_on_the_admin_port(overlay: str) -> None:
    """Liveness and startup probe /healthz, readiness /readyz, all on the `admin` port, which
    is the port of the ConfigMap's admin_listen."""
    objs = rendered(overlay)
    [gw] = [c for c in _pod(objs)["containers"] if c["name"] == "gateway"]
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gw["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    [admin] = [p for p in gw["ports"] if p["name"] == "admin"]
    assert _gateway_config(objs).admin_listen.endswith(f":{admin['containerPort']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_geoipupdate_runs_once_before_the_gateway_and_beside_it(overlay: str) -> None:
    """An init container downloads the databases once (no frequency) into the volume the
    gateway reads geo.country_db from; a sidecar refreshes them on a frequency."""
    objs = rendered(overlay)
    pod = _pod(objs)
    [init] = pod["initContainers"]
    [side] = [c for c in pod["containers"] if c["name"] == "geoipupdate"]
    [gw] = [c for c in pod["containers"] if c["name"] == "gateway"]

    def env(c: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value") for e in c["env"]}

    assert "GEOIPUPDATE_FREQUENCY" not in env(init)
    assert int(env(side)["GEOIPUPDATE_FREQUENCY"]) > 0
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
              for c in (init, side, gw)}
    geo_dir = mounts["gateway"]["geoip"]
    assert _gateway_config(objs).geo.country_db.startswith(geo_dir + "/")
    assert mounts["geoipupdate-init"]["geoip"] == mounts["geoipupdate"]["geoip"]


# --- network, disruption ---------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_admin_port_is_open_to_the_monitoring_namespace_only(overlay: str) -> None:
    """The gateway's NetworkPolicy admits the admin port (9090) only from the `monitoring`
    namespace, and no rule opens every port."""
    objs = rendered(overlay)
    [pol] = [o for o in by_kind(objs, "NetworkPolicy") if o["metadata"]["name"] ==
             "model-gateway"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    admin_rules = []
    for rule in pol["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        if any(p["port"] == 9090 for p in rule["ports"]):
            admin_rules.append(rule)
    [rule] = admin_rules
    assert rule["from"] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_disruption_budget_covers_the_gateway_pods(overlay: str) -> None:
    """A PodDisruptionBudget selects the gateway pods and leaves at least one running."""
    objs = rendered(overlay)
    [pdb] = by_kind(objs, "PodDisruptionBudget")
    labels = _deployment_labels(objs)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    [dep] = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == "model-gateway"]
    assert dep["spec"]["replicas"] >= 2


def _deployment_labels(objs: list[dict[str, Any]]) -> dict[str, str]:
    [dep] = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == "model-gateway"]
    labels: dict[str, str] = dep["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_edge_service_keeps_client_addresses() -> None:
    """The edge overlay's public Service is a LoadBalancer with externalTrafficPolicy Local
    on the proxy port; the metrics Service is headless and only the admin port."""
    objs = rendered("edge")
    services = {o["metadata"]["name"]: o for o in by_kind(objs, "Service")}
    edge = services["model-gateway"]["spec"]
    assert edge["type"] == "LoadBalancer" and edge["externalTrafficPolicy"] == "Local"
    assert [p["targetPort"] for p in edge["ports"]] == ["proxy"]
    metrics_svc = services["model-gateway-metrics"]["spec"]
    assert metrics_svc["clusterIP"] == "None"
    assert [p["targetPort"] for p in metrics_svc["ports"]] == ["admin"]


# --- monitoring --------------------------------------------------------------------------------

_NAME = re.compile(r"\bgateway_[a-z0-9_]+")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names a real gateway's /metrics exposes (counters with _total, histograms
    with _bucket/_sum/_count), after one proxied request."""
    import asyncio

    async def scrape() -> str:
        async with FakeUpstream() as upstream, running_gateway(
                tmp_path_factory.mktemp("kit"), upstream.url) as gw:
            _, key = await gw.issue_key()
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/messages", headers={
                        "x-api-key": key, "X-Forwarded-For": "192.0.2.1"},
                        json={"model": "claude-test-1", "max_tokens": 8,
                              "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200
                async with s.get(gw.admin_url + "/metrics") as r:
                    return await r.text()

    text = asyncio.run(scrape())
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _rule_exprs() -> dict[str, str]:
    [rule] = by_kind(rendered("edge"), "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def test_the_alerts_cover_the_required_conditions() -> None:
    """Alerts exist for the store unavailable, a stale geo database, a denial spike,
    upstream 5xx and screening flags."""
    exprs = _rule_exprs()
    for alert in ("GatewayStoreUnavailable", "GatewayGeoDatabaseStale", "GatewayDenialSpike",
                  "GatewayUpstream5xx", "GatewayScreeningFlags"):
        assert alert in exprs


def test_alert_expressions_name_exported_metrics(exported: set[str]) -> None:
    """Every gateway_* metric in a PrometheusRule expression is exported by a running
    gateway, except the ones listed as pending with the work that exports them."""
    assert "gateway_build_info" in exported and "gateway_model_requests_total" in exported
    for alert, expr in _rule_exprs().items():
        names = set(_NAME.findall(expr))
        assert names, alert
        missing = names - exported - set(PENDING_METRICS)
        assert not missing, f"{alert}: {sorted(missing)}"
    for name in PENDING_METRICS:
        assert name not in exported, f"{name} is exported now: drop it from PENDING_METRICS"


def test_the_dashboard_is_json_naming_exported_metrics(exported: set[str]) -> None:
    """The Grafana dashboard is valid JSON; every panel has a query and every gateway_*
    metric it queries is exported."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"]
    seen: set[str] = set()
    for panel in dash["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = set(_NAME.findall(expr))
            assert names and names <= exported, (panel["title"], sorted(names - exported))
            seen |= names
    assert {"gateway_requests_total", "gateway_model_requests_total", "gateway_store_up",
            "gateway_build_info"} <= seen

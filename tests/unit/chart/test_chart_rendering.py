"""The Helm chart, rendered offline: conventions, the operator Deployment, the platform policy and options.

What the objects do on a real API server is tested in tests/integration/chart/.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart
from kubetune.operator import settings as operator_settings
from kubetune.operator.platform import policy as operator_policy

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "kubetune"
Render = Callable[..., list[dict[str, Any]]]


def only(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = chart.find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[m['metadata']['name'] for m in found]}"
    return found[0]


def operator_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


class TestChartConventions:
    def test_chart_yaml_is_apiversion_v2_with_a_kube_version_constraint(self) -> None:
        meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
        assert meta["apiVersion"] == "v2"
        assert meta["name"] == "kubetune"
        assert meta["kubeVersion"] == ">=1.30.0-0"
        assert meta["appVersion"] == "0.1.0"

    def test_lints_strictly_with_defaults_and_with_every_option_on(self, helm_bin: Path) -> None:
        chart.lint(helm_bin)
        chart.lint(helm_bin, {"watchNamespaces": ["team-a", "team-b"], "serviceMonitor": {"enabled": True},
                              "grafanaDashboard": {"enabled": True},
                              "policy": {"defaults": {"maxConcurrentJobs": 2},
                                         "namespaces": {"team-a": {"maxTotalGpus": 8}}}})

    def test_the_chart_has_helpers_notes_and_a_values_schema(self) -> None:
        helpers = (CHART / "templates" / "_helpers.tpl").read_text()
        for name in ("kubetune.name", "kubetune.fullname", "kubetune.labels", "kubetune.selectorLabels"):
            assert f'define "{name}"' in helpers
        assert (CHART / "templates" / "NOTES.txt").read_text().strip()
        json.loads((CHART / "values.schema.json").read_text())

    def test_kube_version_is_enforced(self, helm_bin: Path) -> None:
        def template(kube_version: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(helm_bin), "template", "kt", str(CHART), "--kube-version", kube_version],
                                  capture_output=True, text=True, timeout=60)
        assert template("1.30.0").returncode == 0
        too_old = template("1.29.9")
        assert too_old.returncode != 0 and "kubeVersion" in too_old.stderr + too_old.stdout

    def test_notes_tell_how_to_check_bind_tenants_and_upgrade_crds(self, helm_bin: Path) -> None:
        proc = subprocess.run([str(helm_bin), "install", "kt", str(CHART), "--namespace", "ml", "--dry-run=client"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        notes = proc.stdout.split("NOTES:", 1)[1]
        assert "kubectl -n ml rollout status deployment/kt-kubetune" in notes
        assert "--clusterrole=kubetune-edit" in notes
        assert "kubectl apply --server-side -f kubetune/crds/" in notes

    def test_selectors_never_carry_the_chart_version_label(self, render: Render) -> None:
        manifests = render({"serviceMonitor": {"enabled": True}})
        deployment = only(manifests, "Deployment")
        selector = deployment["spec"]["selector"]["matchLabels"]
        service_selector = only(manifests, "Service")["spec"]["selector"]
        monitor_selector = only(manifests, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
        for labels in (selector, service_selector, monitor_selector):
            assert "helm.sh/chart" not in labels
            assert "app.kubernetes.io/version" not in labels
        assert service_selector == selector == monitor_selector
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()

    def test_every_object_carries_the_recommended_labels(self, render: Render) -> None:
        for manifest in render():
            labels = manifest["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "kubetune", manifest["metadata"]["name"]
            assert labels["app.kubernetes.io/instance"] == "kubetune"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"] == "kubetune-0.1.0"

    def test_names_follow_the_release_and_the_overrides(self, render: Render) -> None:
        assert only(render(release="prod"), "Deployment")["metadata"]["name"] == "prod-kubetune"
        assert only(render(release="kubetune"), "Deployment")["metadata"]["name"] == "kubetune"
        assert only(render({"fullnameOverride": "tuner"}), "Deployment")["metadata"]["name"] == "tuner"


def _schema_keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        keys.add(path)
        keys |= _schema_keys(sub, f"{path}.")
    return keys


def _values_keys(values: Any, schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Keys of values.yaml down to where the schema stops describing properties (free-form objects)."""
    keys: set[str] = set()
    if not isinstance(values, dict):
        return keys
    for key, value in values.items():
        path = f"{prefix}{key}"
        keys.add(path)
        sub = (schema.get("properties") or {}).get(key) or {}
        if sub.get("properties"):
            keys |= _values_keys(value, sub, f"{path}.")
    return keys


class TestValues:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values_text = (CHART / "values.yaml").read_text()

    def test_values_yaml_and_the_schema_describe_the_same_keys(self) -> None:
        values = yaml.safe_load(self.values_text)
        assert _values_keys(values, self.schema) == _schema_keys(self.schema)

    def test_every_key_has_a_comment_right_above_it(self) -> None:
        lines = self.values_text.splitlines()
        stack: list[tuple[int, str]] = []
        undocumented = []
        schema_keys = _schema_keys(self.schema)
        for number, line in enumerate(lines):
            match = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
            if not match:
                continue
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key])
            stack.append((indent, key))
            if path in schema_keys and not lines[number - 1].strip().startswith("#"):
                undocumented.append(path)
        assert undocumented == []

    @pytest.mark.parametrize(("values", "complaint"), [
        ({"policy": {"namespaces": {"team-a": {"maxGPUsPerJob": 2}}}}, "maxGPUsPerJob"),
        ({"policy": {"defaults": {"maxConcurrentJobs": -1}}}, "maxConcurrentJobs"),
        ({"operator": {"logLevel": "LOUD"}}, "logLevel"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"policy": {"namespaces": {"team-a": {"allowedServingImages": "registry.example/*"}}}},
         "allowedServingImages"),
        ({"unknownKey": 1}, "unknownKey"),
    ])
    def test_the_schema_rejects_bad_values_naming_the_key(self, helm_bin: Path, values: dict[str, Any],
                                                          complaint: str) -> None:
        with pytest.raises(chart.ChartError, match=complaint):
            chart.render(helm_bin, values)


class TestOperatorDeployment:
    def test_one_replica_replaced_by_recreate(self, render: Render) -> None:
        spec = only(render(), "Deployment")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}

    def test_pod_and_container_meet_the_restricted_pod_security_level(self, render: Render) -> None:
        pod = only(render(), "Deployment")["spec"]["template"]["spec"]
        container = operator_container(render())
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert not any("hostPath" in v for v in pod["volumes"])

    def test_tmp_is_a_writable_empty_dir_on_the_read_only_root(self, render: Render) -> None:
        manifests = render()
        pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in operator_container(manifests)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]

    def test_probes_hit_the_operators_health_endpoint_on_its_plain_http_metrics_port(self, render: Render) -> None:
        container = operator_container(render({"operator": {"httpPort": 9090, "metricsPort": 9091}}))
        assert container["ports"] == [{"name": "http", "containerPort": 9090, "protocol": "TCP"},
                                      {"name": "metrics", "containerPort": 9091, "protocol": "TCP"}]
        assert (env_of(container)["KUBETUNE_HTTP_PORT"], env_of(container)["KUBETUNE_METRICS_PORT"]) == ("9090", "9091")
        for probe in ("livenessProbe", "readinessProbe"):
            # /healthz is on both ports (operator/progress/server.py); the metrics port is never HTTPS.
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    def test_image_tag_defaults_to_the_app_version_and_a_digest_wins(self, render: Render) -> None:
        assert operator_container(render())["image"] == "ghcr.io/kubetune/operator:0.1.0"
        digest = "sha256:" + "a" * 64
        container = operator_container(render({"image": {"repository": "registry.example/op", "digest": digest},
                                               "trainer": {"image": {"repository": "registry.example/tr",
                                                                     "tag": "v2"}}}))
        assert container["image"] == f"registry.example/op@{digest}"
        assert env_of(container)["KUBETUNE_TRAINER_IMAGE"] == "registry.example/tr:v2"

    def test_resources_are_set_and_configurable(self, render: Render) -> None:
        assert operator_container(render())["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
        custom = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
        assert operator_container(render({"resources": custom}))["resources"] == custom

    def test_every_setting_the_operator_reads_is_set_from_values(self, render: Render) -> None:
        env = env_of(operator_container(render()))
        given = env_of(operator_container(render({"progressKey": {"existingSecret": "my-key"}})))
        source = Path(operator_settings.__file__).read_text()
        read_by_operator = set(re.findall(r'"(KUBETUNE_[A-Z_]+)"', source))
        assert read_by_operator, "no KUBETUNE_* variables found in operator/settings.py"
        # The signing key comes either from a given Secret or from the Secret the operator makes.
        assert read_by_operator <= env.keys() | {"KUBETUNE_SECRET_KEY"}
        assert read_by_operator <= given.keys() | {"KUBETUNE_SECRET_KEY_SECRET"}

    def test_every_variable_the_chart_sets_is_one_the_operator_reads(self, render: Render) -> None:
        env = env_of(operator_container(render()))
        operator_source = "\n".join(p.read_text() for p in (REPO / "operator").glob("*.py"))
        unread = sorted(name for name in env if f'"{name}"' not in operator_source)
        assert unread == [], f"the chart sets variables no operator module reads: {unread}"

    def test_the_progress_url_points_at_the_charts_service(self, render: Render) -> None:
        manifests = render(namespace="ml-platform")
        service = only(manifests, "Service")
        env = env_of(operator_container(manifests))
        assert env["KUBETUNE_PROGRESS_URL"] == (
            f"https://{service['metadata']['name']}.ml-platform.svc:{service['spec']['ports'][0]['port']}/v1/reports")
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        plain = env_of(operator_container(render({"progressTls": {"enabled": False}}, namespace="ml-platform")))
        assert plain["KUBETUNE_PROGRESS_URL"].startswith("http://")

    def test_the_operator_makes_the_signing_key_unless_one_is_given(self, render: Render) -> None:
        """No random value in the rendered chart: re-rendering (every Argo CD sync; Helm's lookup
        returns nothing there) would rotate the key and invalidate every running job's token."""
        first = render()
        # The progress TLS Secret (type kubernetes.io/tls) is the only one the chart renders.
        assert [s["type"] for s in chart.find(first, "Secret")] == ["kubernetes.io/tls"]
        plain = {"progressTls": {"enabled": False}}
        assert render(plain) == render(plain)
        assert chart.find(render(plain), "Secret") == []
        env = env_of(operator_container(first))
        assert "KUBETUNE_SECRET_KEY" not in env
        assert env["KUBETUNE_SECRET_KEY_SECRET"] == "kubetune-system/kubetune-progress-key"
        role = only(first, "Role", "kubetune-signing-key")
        assert {(tuple(r["verbs"]), tuple(r.get("resourceNames", ()))) for r in role["rules"]} == {
            (("create",), ()), (("get",), ("kubetune-progress-key",))}

        given = render({"progressKey": {"existingSecret": "my-key", "secretKey": "hmac"}})
        assert [s for s in chart.find(given, "Secret") if s["type"] == "Opaque"] == []
        assert chart.find(given, "Role") == []
        assert env_of(operator_container(given))["KUBETUNE_SECRET_KEY"] == {
            "secretKeyRef": {"name": "my-key", "key": "hmac"}}


class TestWatchScope:
    def test_cluster_wide_by_default_with_a_cluster_role(self, render: Render) -> None:
        manifests = render()
        assert env_of(operator_container(manifests))["KUBETUNE_NAMESPACES"] == ""
        binding = only(manifests, "ClusterRoleBinding", "kubetune-operator")
        assert binding["roleRef"]["name"] == only(manifests, "ClusterRole", "kubetune-operator")["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune",
                                        "namespace": "kubetune-system"}]
        assert chart.find(manifests, "Role", "kubetune-operator") == []

    def test_listed_namespaces_get_a_role_each_and_no_cluster_wide_operator_role(self, render: Render) -> None:
        manifests = render({"watchNamespaces": ["team-a", "team-b"]})
        assert env_of(operator_container(manifests))["KUBETUNE_NAMESPACES"] == "team-a,team-b"
        assert sorted(r["metadata"]["namespace"] for r in chart.find(manifests, "Role", "kubetune-operator")) == [
            "team-a", "team-b"]
        assert sorted(b["metadata"]["namespace"] for b in chart.find(manifests, "RoleBinding", "kubetune-operator")) \
            == ["team-a", "team-b"]
        assert chart.find(manifests, "ClusterRole", "kubetune-operator") == []
        cluster_wide = [rule for role in chart.find(manifests, "ClusterRole") for rule in role["rules"]
                        if role["metadata"]["name"] not in ("kubetune-edit", "kubetune-view")]
        assert {r for rule in cluster_wide for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
        assert {v for rule in cluster_wide for v in rule["verbs"]} == {"list", "watch"}

    def test_nothing_cluster_scoped_for_the_operator_without_the_observer(self, render: Render) -> None:
        manifests = render({"watchNamespaces": ["team-a"], "rbac": {"clusterObserver": False}})
        assert [r["metadata"]["name"] for r in chart.find(manifests, "ClusterRole")] == ["kubetune-edit",
                                                                                        "kubetune-view"]
        assert chart.find(manifests, "ClusterRoleBinding") == []


SPEC_RULE_DEFAULTS = {"allowedTolerations": [], "allowedNodeSelectors": [], "allowedPriorityClasses": [],
                      "allowTrustRemoteCode": False, "writableClaims": ["*"], "defaultCpu": "", "defaultMemory": "",
                      "scratchSizeLimit": "64Gi", "restartStalledTraining": False, "tenant": "",
                      "allowedServiceAccounts": [], "hfEndpoint": ""}
"""The spec rules' defaults: nothing beyond what a tenant could do itself."""


class TestPlatformPolicy:
    def policy(self, render: Render, values: dict[str, Any] | None = None) -> dict[str, Any]:
        document = yaml.safe_load(chart.policy_document(render(values)))
        assert document["apiVersion"] == "kubetune.io/v1alpha1"
        assert document["kind"] == "PlatformPolicy"
        return dict(document)

    def test_defaults_mean_no_quota_and_nothing_a_tenant_could_not_do_itself(self, render: Render) -> None:
        assert self.policy(render) == {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "PlatformPolicy",
            "defaults": {"maxConcurrentJobs": 0, "maxGpusPerJob": 0, "maxTotalGpus": 0,
                         "allowedModelSources": [], **SPEC_RULE_DEFAULTS},
            "namespaces": {}}  # no image keys: allowedServingImages unset means [] (the operator's own images)

    def test_a_namespace_entry_is_complete_taking_left_out_keys_from_the_defaults(self, render: Render) -> None:
        policy = self.policy(render, {"policy": {
            "defaults": {"maxConcurrentJobs": 2, "maxGpusPerJob": 4, "maxTotalGpus": 8,
                         "allowedModelSources": ["pvc://*"], "allowedServingImages": []},
            "namespaces": {"team-a": {"maxTotalGpus": 16, "maxConcurrentJobs": 0,
                                      "allowedModelSources": ["hf://org/*", "pvc://*"]}}}})
        assert policy["namespaces"]["team-a"] == {
            "maxConcurrentJobs": 0,  # an explicit 0 (no limit) is kept, not replaced by the default 2
            "maxGpusPerJob": 4, "maxTotalGpus": 16,
            "allowedModelSources": ["hf://org/*", "pvc://*"], "allowedServingImages": [], **SPEC_RULE_DEFAULTS}
        assert policy["defaults"]["maxConcurrentJobs"] == 2

    def test_a_namespace_entry_keeps_the_keys_the_defaults_leave_unset(self, render: Render) -> None:
        """allowedServingImages and the deprecated allowedTrainerImages are unset in the chart's defaults:
        a namespace entry that sets them must still reach the operator."""
        policy = self.policy(render, {"policy": {"namespaces": {
            "team-a": {"allowedServingImages": ["registry.example/serving/*"]},
            "legacy": {"allowedTrainerImages": ["registry.corp/*"]}}}})
        assert policy["namespaces"]["team-a"]["allowedServingImages"] == ["registry.example/serving/*"]
        assert policy["namespaces"]["legacy"]["allowedTrainerImages"] == ["registry.corp/*"]
        assert "allowedServingImages" not in policy["namespaces"]["legacy"]  # so the legacy list stands in

    def test_an_upgrade_keeps_serving_what_allowed_trainer_images_allowed(self, render: Render) -> None:
        """Values written before allowedServingImages existed: the chart's defaults must not set it (an
        empty list there would silently narrow serving to the operator's own images)."""
        document = self.policy(render, {"policy": {"defaults": {"allowedTrainerImages": ["registry.corp/*"]}}})
        assert "allowedServingImages" not in document["defaults"]
        loaded = operator_policy.policy_from_dict(document)
        assert loaded.limits_for("team-a").image_allowed("registry.corp/serve:1")
        assert loaded.deprecations and "allowedServingImages" in loaded.deprecations[0]

    def test_notes_warn_about_allowed_trainer_images(self, helm_bin: Path, tmp_path: Path) -> None:
        def notes(values: dict[str, Any]) -> str:
            (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
            proc = subprocess.run([str(helm_bin), "install", "kt", str(CHART), "--namespace", "ml", "--dry-run=client",
                                   "--values", str(tmp_path / "values.yaml")], capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split("NOTES:", 1)[1]
        legacy = notes({"policy": {"namespaces": {"team-a": {"allowedTrainerImages": ["registry.corp/*"]}}}})
        assert "allowedTrainerImages is deprecated" in legacy and "policy.namespaces.team-a" in legacy
        assert "allowedServingImages" in legacy
        assert "deprecated" not in notes({"policy": {"defaults": {"allowedServingImages": ["registry.corp/*"]}}})

    def test_the_operator_reads_the_mounted_policy_file(self, render: Render) -> None:
        manifests = render()
        deployment = only(manifests, "Deployment")
        container = operator_container(manifests)
        path = Path(env_of(container)["KUBETUNE_POLICY_FILE"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        config_map = only(manifests, "ConfigMap", volume["configMap"]["name"])
        assert path.name in config_map["data"]

    def test_a_policy_change_restarts_the_operator(self, render: Render) -> None:
        def checksum(values: dict[str, Any] | None) -> str:
            annotations = only(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]
            return str(annotations["checksum/policy"])
        assert checksum(None) == checksum(None)
        assert checksum(None) != checksum({"policy": {"defaults": {"maxConcurrentJobs": 1}}})


class TestOptionalFeatures:
    def test_service_monitor_and_dashboard_are_off_by_default(self, render: Render) -> None:
        manifests = render()
        assert chart.find(manifests, "ServiceMonitor") == []
        assert sorted(c["metadata"]["name"] for c in chart.find(manifests, "ConfigMap")) == [
            "kubetune-admission-params", "kubetune-policy"]

    def test_service_monitor_scrapes_metrics_on_the_metrics_port(self, render: Render) -> None:
        manifests = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
        monitor = only(manifests, "ServiceMonitor")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        ports = {p["name"]: p for p in only(manifests, "Service")["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert ports["metrics"]["targetPort"] == "metrics" and ports["metrics"]["port"] == 8081
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    def test_dashboard_shows_progress_losses_and_accelerator_seconds_per_namespace(self, render: Render) -> None:
        manifests = render({"grafanaDashboard": {"enabled": True}})
        config_map = only(manifests, "ConfigMap", "kubetune-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        dashboard = json.loads(config_map["data"]["kubetune.json"])
        panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
        assert any("kubetune_job_progress_ratio" in e for e in panels["Training progress"])
        assert any("kubetune_job_train_loss" in e for e in panels["Training loss"])
        assert any("kubetune_job_validation_loss" in e for e in panels["Validation loss"])
        accelerators = panels["Accelerator-seconds per namespace (dashboard range)"]
        assert any("sum by (namespace, kind)" in e and "kubetune_accelerator_seconds_total" in e for e in accelerators)
        # Which series each query names is checked in test_monitoring_queries.py (parsed PromQL).


class TestCustomResourceDefinitions:
    def test_the_charts_crds_are_byte_identical_to_the_repositorys(self) -> None:
        repo_crds = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
        chart_crds = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
        assert repo_crds, "crds/ holds no CRDs"
        assert sorted(chart_crds) == sorted(repo_crds)
        stale = sorted(name for name in repo_crds if chart_crds[name] != repo_crds[name])
        assert stale == [], f"charts/kubetune/crds is stale ({stale}): run `cp crds/*.yaml charts/kubetune/crds/`"

    def test_helm_template_leaves_crds_to_the_crds_folder(self, render: Render) -> None:
        assert chart.find(render(), "CustomResourceDefinition") == []


class TestProgressTls:
    """The report port serves HTTPS with a certificate the chart makes; trainer pods get the CA."""

    def test_the_generated_certificate_is_valid_for_the_service_name_and_signed_by_the_ca(
            self, render: Render, tmp_path: Path) -> None:
        import asyncio
        import ssl

        from aiohttp import web

        from kubetune.operator.progress import server as progress

        manifests = render(namespace="ml-platform")
        secret = only(manifests, "Secret", "kubetune-progress-tls")
        assert secret["type"] == "kubernetes.io/tls"
        files = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
        (tmp_path / "tls.crt").write_text(files["tls.crt"])
        (tmp_path / "tls.key").write_text(files["tls.key"])
        service = only(manifests, "Service")["metadata"]["name"]

        async def handshake(server_hostname: str) -> str:
            async def ok(_: web.Request) -> web.Response:
                return web.Response(text="ok")

            app = web.Application()
            app.router.add_get("/", ok)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0,
                               ssl_context=progress.server_tls_context(str(tmp_path / "tls.crt"),
                                                                       str(tmp_path / "tls.key")))
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                client = ssl.create_default_context(cadata=files["ca.crt"])
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                               server_hostname=server_hostname)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = (await reader.read()).decode()
                writer.close()
                return answer
            finally:
                await runner.cleanup()

        for name in (f"{service}.ml-platform.svc", f"{service}.ml-platform.svc.cluster.local", service):
            assert asyncio.run(handshake(name)).endswith("ok"), name
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(handshake(f"{service}.other-namespace.svc"))

    def test_the_operator_serves_it_and_pods_get_the_ca(self, render: Render) -> None:
        manifests = render()
        container = operator_container(manifests)
        env = env_of(container)
        assert env["KUBETUNE_TLS_CERT_FILE"] == "/etc/kubetune-tls/tls.crt"
        assert env["KUBETUNE_TLS_KEY_FILE"] == "/etc/kubetune-tls/tls.key"
        assert env["KUBETUNE_PROGRESS_CA"] == {"secretKeyRef": {"name": "kubetune-progress-tls", "key": "ca.crt"}}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in only(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/etc/kubetune-tls"]]["secret"]["secretName"] == "kubetune-progress-tls"

    def test_an_existing_secret_is_used_as_given(self, render: Render) -> None:
        manifests = render({"progressTls": {"existingSecret": "from-cert-manager"}})
        assert chart.find(manifests, "Secret", "kubetune-progress-tls") == []
        assert env_of(operator_container(manifests))["KUBETUNE_PROGRESS_CA"] == {
            "secretKeyRef": {"name": "from-cert-manager", "key": "ca.crt"}}

    def test_off_means_plain_http_and_no_certificate(self, render: Render) -> None:
        manifests = render({"progressTls": {"enabled": False}})
        assert chart.find(manifests, "Secret") == []  # the signing key is the operator's own
        env = env_of(operator_container(manifests))
        assert env["KUBETUNE_TLS_CERT_FILE"] == env["KUBETUNE_TLS_KEY_FILE"] == env["KUBETUNE_PROGRESS_CA"] == ""
        assert "/etc/kubetune-tls" not in {m["mountPath"] for m in operator_container(manifests)["volumeMounts"]}

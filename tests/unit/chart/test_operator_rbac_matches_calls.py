"""The chart grants the operator exactly the API calls its code makes: nothing missing, nothing extra.

The calls are read from the operator's source: every Kubernetes API method the client modules
(`client.py`, `sweeps/client.py`) name on their API objects (e.g. `self.batch.create_namespaced_job`
-> create jobs.batch; custom objects by the plural they pass), and every resource a kopf handler in
the handler modules (`jobs/handlers.py`, `sweeps/handlers.py`) watches (list + watch; change handlers
also patch, for kopf's bookkeeping annotations). The chart's rules come from `helm template`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev import chart

REPO = Path(__file__).resolve().parents[3]
OPERATOR = REPO / "operator"
Render = Callable[..., list[dict[str, Any]]]
Permission = tuple[str, str, str]
"""(API group, resource, verb)."""

VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch",
         "replace": "update", "delete": "delete"}
RESOURCES = {
    "job": ("batch", "jobs"), "config_map": ("", "configmaps"), "secret": ("", "secrets"),
    "pod": ("", "pods"), "event": ("", "events"), "service": ("", "services"),
    "deployment": ("apps", "deployments"), "persistent_volume_claim": ("", "persistentvolumeclaims"),
    "custom_object": ("kubetune.io", "finetunejobs"),
    "cluster_custom_object": ("kubetune.io", "finetunejobs"), "custom_object_status": ("kubetune.io", "finetunejobs/status"),
    "job_status": ("batch", "jobs/status"), "deployment_status": ("apps", "deployments/status"),
}
CLIENT_MODULES = ("client.py", "sweeps/client.py")
HANDLER_MODULES = ("jobs/handlers.py", "sweeps/handlers.py")
CUSTOM_PLURALS = {"PLURAL": ("kubetune.io", "finetunejobs"), "JOBS": ("kubetune.io", "finetunejobs"),
                  "SWEEPS": ("kubetune.io", "finetunesweeps"), "KOPF_PEERINGS": ("kopf.dev", "kopfpeerings"),
                  "CLUSTER_KOPF_PEERINGS": ("kopf.dev", "clusterkopfpeerings"),
                  "KUEUE_WORKLOADS": ("kueue.x-k8s.io", "workloads")}
"""Names the client modules give the custom-object plural they pass, with its API group."""
STARRED_RESOURCES = {"RESOURCE": "finetunejobs", "SWEEP_RESOURCE": "finetunesweeps"}
"""The (group, version, plural) triples handler decorators unpack."""
CHANGE_HANDLERS = {"create", "update", "resume", "delete", "field"}
API_OBJECTS = {"core", "batch", "custom", "apps", "networking", "events"}


def client_calls() -> set[Permission]:
    """Permissions behind every `self.<api>.<verb>_namespaced_<resource>` in the client modules."""
    found: set[Permission] = set()
    for module in CLIENT_MODULES:
        tree = ast.parse((OPERATOR / module).read_text())
        called_with = {id(node.func): node.args for node in ast.walk(tree) if isinstance(node, ast.Call)}
        # Passed on rather than called (`self._json(self.custom.patch_..., GROUP, ...)`,
        # `functools.partial(self.custom.list_..., GROUP, ...)`): the arguments that follow it.
        called_with |= {id(node.args[0]): node.args[1:] for node in ast.walk(tree)
                        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Attribute)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
                    and node.value.attr in API_OBJECTS):
                continue
            match = re.fullmatch(r"([a-z]+)_(?:namespaced_)?(\w+?)(?:_for_all_namespaces)?", node.attr)
            assert match and match.group(1) in VERBS and match.group(2) in RESOURCES, (
                f"{module} calls {node.value.attr}.{node.attr}: teach this test its permission, "
                "then grant it in charts/kubetune/templates/rbac-operator.yaml")
            group, resource = RESOURCES[match.group(2)]
            if "custom_object" in match.group(2):
                args = called_with.get(id(node), [])
                plural = next((a.id for a in args if isinstance(a, ast.Name) and a.id in CUSTOM_PLURALS), None)
                assert plural, f"{module}: cannot tell which custom resource {node.attr} is called on"
                group, plural_name = CUSTOM_PLURALS[plural]
                resource = plural_name + resource.removeprefix("finetunejobs")
            found.add((group, resource, VERBS[match.group(1)]))
            if match.group(1) == "list":  # list calls feed the informers (operator/cache.py): list, then watch
                found.add((group, resource, "watch"))
    return found


def peering_permissions() -> set[Permission]:
    """kopf peering (the handlers configure it): it lists and watches the peering objects and patches
    its own record into them, cluster-wide or per namespace."""
    if "settings.peering.name" not in (OPERATOR / "jobs" / "handlers.py").read_text():
        return set()
    return {("kopf.dev", resource, verb) for resource in ("kopfpeerings", "clusterkopfpeerings")
            for verb in ("list", "watch", "patch")}


def kopf_watches() -> set[Permission]:
    """Permissions kopf needs for the handlers in the handler modules."""
    found: set[Permission] = set()
    for module in HANDLER_MODULES:
        tree = ast.parse((OPERATOR / module).read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            dotted = ast.unparse(node.func)
            if not (dotted.startswith("kopf.on.") or dotted in ("kopf.timer", "kopf.daemon", "kopf.index")):
                continue
            kind = dotted.rsplit(".", 1)[1]
            if kind in ("startup", "cleanup", "login", "probe"):
                continue
            if node.args and isinstance(node.args[0], ast.Starred):
                starred = ast.unparse(node.args[0].value)
                assert starred in STARRED_RESOURCES, f"{module}: unknown resource triple {starred}"
                group, resource = "kubetune.io", STARRED_RESOURCES[starred]
            else:
                literals = [a.value for a in node.args if isinstance(a, ast.Constant)]
                if isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "GROUP" and literals:
                    literals = ["kubetune.io", "v1alpha1", literals[-1]]  # (models.GROUP, models.VERSION, "x")
                assert len(literals) == 3, f"cannot read the resource of {ast.unparse(node)}"
                group, resource = str(literals[0]), str(literals[2])
            found |= {(group, resource, "list"), (group, resource, "watch")}
            if kind in CHANGE_HANDLERS or kind in ("timer", "daemon"):
                found.add((group, resource, "patch"))
    return found


OWNER_MODULES = {"jobs/builders.py": "finetunejobs", "sweeps/reconcile.py": "finetunesweeps"}
"""Modules that build children of a FineTuneJob / trial jobs of a FineTuneSweep."""


def owner_reference_permissions() -> set[Permission]:
    """An owner reference with `blockOwnerDeletion: true` needs update on the owner's `finalizers`
    subresource where the OwnerReferencesPermissionEnforcement admission plugin runs."""
    found: set[Permission] = set()
    for module, owner in OWNER_MODULES.items():
        if re.search(r'"blockOwnerDeletion":\s*True', (OPERATOR / module).read_text()):
            found.add(("kubetune.io", f"{owner}/finalizers", "update"))
    return found


def granted(rules: list[dict[str, Any]]) -> set[Permission]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def operator_rules(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    roles = chart.find(manifests, "ClusterRole", "kubetune-operator") or chart.find(manifests, "Role", "kubetune-operator")
    assert roles, "the chart renders no operator role"
    return list(roles[0]["rules"])


def test_only_client_and_handlers_talk_to_the_api() -> None:
    """Otherwise the scan below would miss calls: other modules must stay free of API objects."""
    for path in OPERATOR.rglob("*.py"):
        if str(path.relative_to(OPERATOR)) in CLIENT_MODULES + HANDLER_MODULES:
            continue
        source = path.read_text()
        assert not re.search(r"kubernetes\.client\.\w+Api\(|\bkopf\.on\.", source), path.name


def test_the_scan_finds_the_calls_we_know_of() -> None:
    needed = client_calls() | kopf_watches() | owner_reference_permissions() | peering_permissions()
    assert {("kubetune.io", "finetunejobs/status", "patch"), ("batch", "jobs", "create"),
            ("", "secrets", "get"), ("batch", "jobs", "watch"),
            ("kubetune.io", "finetunejobs/finalizers", "update")} <= needed


STALL_RESTART = ("", "pods", "delete")
"""Granted only when the platform policy lets the operator restart stalled trainer pods."""


@pytest.mark.parametrize("values", [
    None, {"watchNamespaces": ["team-a"]}, {"policy": {"defaults": {"restartStalledTraining": True}}},
    {"policy": {"namespaces": {"team-a": {"restartStalledTraining": True}}}, "watchNamespaces": ["team-a"]},
], ids=["cluster-wide", "namespaced", "restarts-stalled", "namespaced-restarts-stalled"])
def test_the_operator_role_grants_exactly_what_the_operator_calls(render: Render, values: Any) -> None:
    needed = client_calls() | kopf_watches() | owner_reference_permissions() | peering_permissions()
    assert STALL_RESTART in needed
    if "restarts" not in repr(values) and "restartStalledTraining" not in repr(values):
        needed -= {STALL_RESTART}  # least privilege: off by default
    rules = granted(operator_rules(render(values)))
    assert sorted(needed - rules) == [], "the operator calls these but the chart does not grant them"
    assert sorted(rules - needed) == [], "the chart grants these but the operator never calls them"


def test_no_wildcards_and_no_secret_listing(render: Render) -> None:
    for values in (None, {"watchNamespaces": ["team-a"]}):
        for role in chart.find(render(values), "ClusterRole") + chart.find(render(values), "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
                if "secrets" in rule["resources"]:
                    assert not {"list", "watch"} & set(rule["verbs"]), role["metadata"]["name"]


def test_tenant_roles_grant_kubetune_resources_only_and_aggregate(render: Render) -> None:
    manifests = render()
    edit = chart.find(manifests, "ClusterRole", "kubetune-edit")[0]
    view = chart.find(manifests, "ClusterRole", "kubetune-view")[0]
    for role in (edit, view):
        assert {r for rule in role["rules"] for r in rule["resources"]} == {
            "finetunejobs", "finetunejobs/status", "finetunesweeps", "finetunesweeps/status"}
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("kubetune.io", "finetunejobs", "create") in granted(edit["rules"])
    assert {verb for _, _, verb in granted(view["rules"])} == {"get", "list", "watch"}
    unaggregated = render({"tenantRoles": {"aggregate": False}})
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate")
                   for k in chart.find(unaggregated, "ClusterRole", "kubetune-edit")[0]["metadata"]["labels"])

"""The chart's ways to scale the operator out: hot standbys (kopf peering) and namespace shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.dev import chart
from kubetune.operator import settings as operator_settings
from tests.unit.chart.test_chart_rendering import Render, env_of, only, operator_container


class TestStandbyReplicas:
    def test_one_replica_by_default_without_peering_objects(self, render: Render) -> None:
        manifests = render()
        assert only(manifests, "Deployment")["spec"]["replicas"] == 1
        assert env_of(operator_container(manifests))["KUBETUNE_PEERING_PRIORITY"] == "0"
        assert chart.find(manifests, "ClusterKopfPeering") == chart.find(manifests, "KopfPeering") == []

    def test_standbys_draw_random_priorities_and_meet_in_a_cluster_wide_peering(self, render: Render) -> None:
        manifests = render({"operator": {"replicas": 2, "peeringLifetime": 20, "peeringName": "ops"}})
        env = env_of(operator_container(manifests))
        assert only(manifests, "Deployment")["spec"]["replicas"] == 2
        assert (env["KUBETUNE_PEERING_PRIORITY"], env["KUBETUNE_PEERING_LIFETIME"], env["KUBETUNE_PEERING"]) == (
            "random", "20", "ops")
        settings = operator_settings.OperatorSettings.from_env(
            {k: v for k, v in env.items() if isinstance(v, str)})
        assert settings.peering_priority > 0 and settings.peering_lifetime == 20
        assert only(manifests, "ClusterKopfPeering")["metadata"]["name"] == "ops"

    def test_a_namespaced_install_gets_a_peering_object_in_each_namespace(self, render: Render) -> None:
        manifests = render({"operator": {"replicas": 2}, "watchNamespaces": ["a", "b"]})
        assert sorted(p["metadata"]["namespace"] for p in chart.find(manifests, "KopfPeering")) == ["a", "b"]

    def test_the_operator_may_watch_peerings_and_its_cached_kinds_but_never_list_secrets(self,
                                                                                        render: Render) -> None:
        rules = only(render(), "ClusterRole", "kubetune-operator")["rules"]
        verbs = {(group, resource): set(rule["verbs"]) for rule in rules for group in rule["apiGroups"]
                 for resource in rule["resources"]}
        assert {"list", "watch"} <= verbs[("", "configmaps")] and {"list", "watch"} <= verbs[("", "services")]
        assert {"list", "watch", "patch"} <= verbs[("kopf.dev", "kopfpeerings")]
        assert not {"list", "watch"} & verbs[("", "secrets")]


class TestNamespaceShards:
    def test_a_shard_serves_its_patterns_with_cluster_wide_rbac(self, render: Render) -> None:
        manifests = render({"operator": {"namespacePatterns": ["team-a-*", "!team-a-sandbox"],
                                         "peeringName": "kubetune-shard-a"}})
        assert env_of(operator_container(manifests))["KUBETUNE_NAMESPACES"] == "team-a-*,!team-a-sandbox"
        assert only(manifests, "ClusterRole", "kubetune-operator")

    @pytest.mark.parametrize("values, message", [
        ({"operator": {"namespacePatterns": ["team-*"]}, "watchNamespaces": ["a"]}, "needs watchNamespaces empty"),
        ({"operator": {"namespacePatterns": ["team-*"], "replicas": 2}}, "give each shard one replica"),
    ])
    def test_contradictory_values_fail_the_render_saying_why(self, helm_bin: Path, values: dict[str, object],
                                                             message: str) -> None:
        with pytest.raises(chart.ChartError, match=message):
            chart.render(helm_bin, values)

"""Tenants under the chart's roles, as real users (minted client certificates) on the real API server:
kubetune-edit works in its namespace only, kubetune-view only reads, neither reaches Secrets, and
the built-in admin/edit/view roles include them through aggregation.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.integration.chart.conftest import Release, Tenants, can_i, finetunejob, kubectl_as, wait_for


def forbidden(proc: Any) -> bool:
    return bool(proc.returncode != 0 and "forbidden" in proc.stderr.lower())


class TestKubetuneEdit:
    def test_creates_and_reads_finetunejobs_in_its_namespace(self, cluster: Any, tenants: Tenants) -> None:
        created = kubectl_as(cluster, tenants.editor, "-n", tenants.a, "create", "-f", "-",
                             input=yaml.safe_dump(finetunejob("alices-job")))
        assert created.returncode == 0, created.stderr
        got = kubectl_as(cluster, tenants.editor, "-n", tenants.a, "get", "finetunejob", "alices-job", "-o", "json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["spec"]["model"]["source"] == "pvc://models/base/tiny-gpt2"
        listed = kubectl_as(cluster, tenants.editor, "-n", tenants.a, "get", "ftj", "-o", "name")
        assert "finetunejob.kubetune.io/alices-job" in listed.stdout.splitlines()
        deleted = kubectl_as(cluster, tenants.editor, "-n", tenants.a, "delete", "finetunejob", "alices-job")
        assert deleted.returncode == 0, deleted.stderr

    def test_cannot_create_or_read_finetunejobs_in_another_namespace(self, cluster: Any, tenants: Tenants) -> None:
        cluster.kubectl("-n", tenants.b, "apply", "-f", "-", input=yaml.safe_dump(finetunejob("bs-job")))
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", tenants.b, "create", "-f", "-",
                                    input=yaml.safe_dump(finetunejob("sneaky"))))
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", tenants.b, "get", "finetunejob", "bs-job"))
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", tenants.b, "get", "finetunejobs"))
        assert forbidden(kubectl_as(cluster, tenants.editor, "get", "finetunejobs", "--all-namespaces"))

    def test_cannot_read_the_operators_secrets(self, cluster: Any, tenants: Tenants, release: Release) -> None:
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", release.namespace, "get", "secret",
                                    release.signing_key_secret))
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", release.namespace, "get", "secrets"))
        # Nor the per-job progress-token Secrets the operator puts in the tenant's own namespace.
        assert forbidden(kubectl_as(cluster, tenants.editor, "-n", tenants.a, "get", "secrets"))

    def test_cannot_write_status(self, cluster: Any, tenants: Tenants) -> None:
        assert not can_i(cluster, "patch", "finetunejobs.kubetune.io/status", "-n", tenants.a, as_user=tenants.editor)


class TestKubetuneView:
    def test_reads_but_does_not_write(self, cluster: Any, tenants: Tenants) -> None:
        cluster.kubectl("-n", tenants.a, "apply", "-f", "-", input=yaml.safe_dump(finetunejob("shared")))
        got = kubectl_as(cluster, tenants.viewer, "-n", tenants.a, "get", "finetunejob", "shared", "-o", "name")
        assert got.returncode == 0, got.stderr
        assert kubectl_as(cluster, tenants.viewer, "-n", tenants.a, "get", "ftj").returncode == 0
        assert forbidden(kubectl_as(cluster, tenants.viewer, "-n", tenants.a, "create", "-f", "-",
                                    input=yaml.safe_dump(finetunejob("viewers-job"))))
        assert forbidden(kubectl_as(cluster, tenants.viewer, "-n", tenants.a, "patch", "finetunejob", "shared",
                                    "--type=merge", "-p", '{"spec":{"suspend":true}}'))
        assert forbidden(kubectl_as(cluster, tenants.viewer, "-n", tenants.a, "delete", "finetunejob", "shared"))

    def test_reads_nothing_in_another_namespace(self, cluster: Any, tenants: Tenants) -> None:
        assert forbidden(kubectl_as(cluster, tenants.viewer, "-n", tenants.b, "get", "finetunejobs"))


class TestAggregationIntoBuiltInRoles:
    def test_namespace_editors_and_admins_get_kubetune_edit(self, cluster: Any, tenants: Tenants) -> None:
        wait_for(lambda: can_i(cluster, "create", "finetunejobs.kubetune.io", "-n", tenants.a,
                               as_user=tenants.namespace_editor), "the edit role to aggregate kubetune-edit")
        created = kubectl_as(cluster, tenants.namespace_editor, "-n", tenants.a, "create", "-f", "-",
                             input=yaml.safe_dump(finetunejob("carols-job")))
        assert created.returncode == 0, created.stderr
        admin_rules = json.loads(cluster.kubectl("get", "clusterrole", "admin", "-o", "json").stdout)["rules"]
        assert any("finetunejobs" in r.get("resources", []) and "create" in r["verbs"] for r in admin_rules)

    def test_namespace_viewers_get_kubetune_view(self, cluster: Any, tenants: Tenants) -> None:
        wait_for(lambda: can_i(cluster, "list", "finetunejobs.kubetune.io", "-n", tenants.a,
                               as_user=tenants.namespace_viewer), "the view role to aggregate kubetune-view")
        assert not can_i(cluster, "create", "finetunejobs.kubetune.io", "-n", tenants.a,
                         as_user=tenants.namespace_viewer)
        assert not can_i(cluster, "list", "finetunejobs.kubetune.io", "-n", tenants.b,
                         as_user=tenants.namespace_viewer)

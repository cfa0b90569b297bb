"""The operator at scale, on a control plane of its own with an audit log of the operator's requests:

- its informers follow the API server (what is created, changed and deleted; only its own children);
- a reconcile reads memory: jobs run to success with no GET of a FineTuneJob or a child and no
  per-job pod list (the old path made ~6 GETs and 2 pod lists per pass);
- a standby replica (same peering name, lower priority) does nothing while the active one lives,
  and takes over within the peering lifetime once the active one is SIGKILLed; nothing is duplicated.

There is no kubelet: tests end pods as a kubelet would; the real Job controller reacts.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import controlplane
from kubetune.operator import cache
from kubetune.operator.client import KubeClient
from kubetune.operator.jobs import builders
from kubetune.operator.sweeps import reconcile as sweep
from kubetune.operator.sweeps.client import SweepClient
from tests.integration.operator.conftest import CRD_FILE, REPO, Kube, finetunejob, free_port, wait_for

USERS = ("kubetune-operator-reads", "kubetune-operator-active", "kubetune-operator-standby")
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: {json.dumps(list(USERS))}
  - level: None
"""
PEERING_CRDS = REPO / "crds" / "kopf-peerings.kopf.dev.yaml"
PEERING_LIFETIME = 6
"""Seconds (KUBETUNE_PEERING_LIFETIME): short, so the takeover is quick to test."""


class Plane:
    def __init__(self, plane: controlplane.ControlPlane, workdir: Path) -> None:
        self.plane, self.workdir = plane, workdir
        self.kube = Kube(plane.api_client())

    def namespace(self) -> str:
        name = f"kubetune-scale-{secrets.token_hex(3)}"
        self.kube.core.create_namespace({"metadata": {"name": name}})
        return name

    def requests(self, user: str) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in self.plane.audit_log.read_text().splitlines() if line.strip()]
        return [e for e in entries if e.get("user", {}).get("username") == user
                and e.get("stage") == "ResponseComplete"]


class Operator:
    """`python -m kubetune.operator` under its own user (its requests are told apart in the audit log)."""

    def __init__(self, plane: Plane, user: str, namespace: str, **env: str) -> None:
        self.user, self.port = user, free_port()
        self.log = plane.workdir / f"{user}.log"
        self.env = {**os.environ, "KUBECONFIG": str(plane.plane.mint_kubeconfig(user, ("system:masters",))),
                    "KUBETUNE_NAMESPACES": namespace, "KUBETUNE_HTTP_HOST": "127.0.0.1",
                    "KUBETUNE_HTTP_PORT": str(self.port), "KUBETUNE_METRICS_PORT": "0",
                    "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{self.port}/v1/reports",
                    "KUBETUNE_SECRET_KEY": secrets.token_hex(16), "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
                    "KUBETUNE_PEERING": "kubetune-scale", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kubetune.operator"], env=self.env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    workdir = tmp_path_factory.mktemp("scale-plane")
    with controlplane.ControlPlane(workdir / "plane", audit_policy=AUDIT_POLICY) as plane:
        for crd in (CRD_FILE, PEERING_CRDS):
            plane.kubectl("apply", "--server-side", "-f", str(crd))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield Plane(plane, workdir)


def succeed(kube: Kube, namespace: str, name: str) -> None:
    """Plays the kubelet through one job's validation and training pods, then waits for Succeeded."""
    wait_for(lambda: kube.job(namespace, f"{name}-validate"), f"{name}'s validation Job", timeout=120)
    kube.run_pod_to_end(namespace, f"{name}-validate", 0, json.dumps({"outcome": "validated", "message": "ok"}))
    wait_for(lambda: kube.job(namespace, f"{name}-train"), f"{name}'s trainer Job", timeout=120)
    kube.run_pod_to_end(namespace, f"{name}-train", 0, json.dumps({
        "outcome": "succeeded", "step": 3, "results": {"perplexity": 4.5}, "modelDigest": "sha256:" + "0" * 64}))
    wait_for(lambda: kube.condition_is(namespace, name, "Succeeded", "True"), f"{name} Succeeded", timeout=120)


def test_informers_follow_the_api_server_and_see_only_the_operators_children(audited: Plane) -> None:
    namespace = audited.namespace()
    child_cache = KubeClient(audited.plane.api_client()).build_cache((namespace,), secret_ttl=30)
    for informer in child_cache.informers[namespace]:
        informer.watch_seconds = 1  # every watch ends at once: each continues from its last resourceVersion
    child_cache.start()
    try:
        assert child_cache.wait_synced(60)
        store, core = child_cache.store, audited.kube.core
        labels = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "ours", "labels": labels},
                                                      "data": {"k": "1"}})
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "theirs"}, "data": {"k": "1"}})
        wait_for(lambda: store.get(cache.CONFIG_MAP, namespace, "ours"), "the labelled ConfigMap in memory")
        time.sleep(2.5)  # a few watch restarts
        core.patch_namespaced_config_map("ours", namespace, {"data": {"k": "2"}})
        wait_for(lambda: (store.get(cache.CONFIG_MAP, namespace, "ours") or {}).get("data") == {"k": "2"},
                 "the change in memory")
        core.delete_namespaced_config_map("ours", namespace)
        wait_for(lambda: store.get(cache.CONFIG_MAP, namespace, "ours") is None, "the deletion in memory")
        assert store.get(cache.CONFIG_MAP, namespace, "theirs") is None  # not ours: never received
    finally:
        child_cache.stop()


def test_a_sweep_reads_its_trials_from_memory_and_sees_a_trial_it_created_at_once(audited: Plane) -> None:
    namespace = audited.namespace()
    kube = KubeClient(audited.plane.api_client())
    kube.cache = kube.build_cache((namespace,), secret_ttl=30)
    kube.cache.start()
    try:
        assert kube.cache.wait_synced(60)
        # The sweep's stand-in owner: a real object, so the garbage collector leaves its dependents alone.
        owner = audited.kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "sweep-owner"}})
        reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "sweep-owner", "uid": owner.metadata.uid,
                     "controller": True}
        label = {sweep.LABEL_SWEEP: "search"}

        def trial(name: str, labels: dict[str, str], owners: list[dict[str, Any]]) -> dict[str, Any]:
            body = finetunejob(name)
            body["metadata"] |= {"labels": labels, "ownerReferences": owners}
            return body

        for body in (trial("search-0", label, [reference]), trial("search-stray", label, []),
                     trial("unrelated", {}, [reference])):
            audited.kube.create_ftj(namespace, body)
        sweep_body = {"metadata": {"namespace": namespace, "name": "search", "uid": owner.metadata.uid}}
        client = SweepClient(kube)

        def names() -> list[str]:
            return sorted(t["metadata"]["name"] for t in client.list_trials(sweep_body))

        wait_for(lambda: names() == ["search-0"], "the trial in memory")
        lists: list[tuple[Any, ...]] = []
        real_list = kube.custom.list_namespaced_custom_object
        kube.custom.list_namespaced_custom_object = lambda *a, **k: lists.append(a) or real_list(*a, **k)
        client.create_trial(namespace, trial("search-1", label, [reference]))
        assert names() == ["search-0", "search-1"]  # written through: no wait for the watch event
        assert lists == [], "a sweep pass listed its trials from the API server"
        # Without a synced cache (a restarted operator's first passes) the same answer comes from one list.
        assert sorted(t["metadata"]["name"] for t in SweepClient(KubeClient(audited.plane.api_client()))
                      .list_trials(sweep_body)) == ["search-0", "search-1"]
    finally:
        kube.cache.stop()


def test_informers_list_in_pages_and_keep_finetunejobs_without_kopfs_copy_of_the_spec(audited: Plane) -> None:
    """Listings in pages (the API server's limit/continue): every object of every page arrives, what no
    page held leaves; a FineTuneJob is kept whole but for kopf's last-handled-configuration."""
    namespace = audited.namespace()
    core, labels = audited.kube.core, {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}
    for index in range(7):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"ours-{index}", "labels": labels},
                                                      "data": {"k": str(index)}})
    body = finetunejob("paged")
    body["metadata"]["annotations"] = {cache.KOPF_DIFFBASE_ANNOTATION: json.dumps({"spec": body["spec"]}),
                                       "team": "a"}
    audited.kube.create_ftj(namespace, body)
    child_cache = KubeClient(audited.plane.api_client()).build_cache((namespace,), secret_ttl=30)
    pages: list[str] = []
    for informer in child_cache.informers[namespace]:
        informer.page_size = 3  # 7 ConfigMaps: three pages
        if informer.kind == cache.CONFIG_MAP:
            listing = informer.list_call

            def counted(listing: Any = listing, **kwargs: Any) -> Any:
                if not kwargs.get("watch"):
                    pages.append(str(kwargs.get("_continue") or ""))
                return listing(**kwargs)

            informer.list_call = counted
    child_cache.store.upsert(cache.CONFIG_MAP, {"metadata": {"name": "gone", "namespace": namespace, "uid": "x",
                                                             "resourceVersion": "1"}})
    child_cache.start()
    try:
        assert child_cache.wait_synced(60)
        store = child_cache.store
        assert sorted(c["data"]["k"] for c in store.list(cache.CONFIG_MAP, namespace)) == [str(i) for i in range(7)]
        assert len(pages) == 3 and pages[0] == "" and all(pages[1:])  # the API server's continue tokens
        assert store.get(cache.CONFIG_MAP, namespace, "gone") is None
        kept = store.get(cache.FINETUNEJOB, namespace, "paged")
        assert kept is not None and kept["metadata"]["annotations"] == {"team": "a"}
        assert kept["spec"] == audited.kube.ftj(namespace, "paged")["spec"]
    finally:
        child_cache.stop()


def test_the_usage_seed_reads_every_job_in_scope_one_page_at_a_time(audited: Plane,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """At start-up the usage counters' seed lists every FineTuneJob: in pages (not every body decoded at
    once), per namespace named, cluster-wide for patterns (it listed a namespace named `team-*` before),
    exclusions kept out."""
    ours, other = audited.namespace(), audited.namespace()
    for namespace, count in ((ours, 5), (other, 2)):
        for index in range(count):
            audited.kube.create_ftj(namespace, finetunejob(f"seed-{index}"))
    monkeypatch.setattr(cache, "LIST_PAGE", 2)
    kube = KubeClient(audited.plane.api_client())
    calls: list[dict[str, Any]] = []
    for method in ("list_namespaced_custom_object", "list_cluster_custom_object"):
        def counted(*args: Any, _call: Any = getattr(kube.custom, method), **kwargs: Any) -> Any:
            calls.append(kwargs)
            listing = _call(*args, **kwargs)
            assert len(listing["items"]) <= 2
            return listing
        monkeypatch.setattr(kube.custom, method, counted)

    def seen(namespaces: tuple[str, ...]) -> list[tuple[str, str]]:
        return sorted((j["metadata"]["namespace"], j["metadata"]["name"]) for j in kube.each_finetunejob(namespaces))

    assert seen((ours,)) == [(ours, f"seed-{i}") for i in range(5)]
    assert len(calls) == 3 and all(c["limit"] == 2 for c in calls) and all(c.get("_continue") for c in calls[1:])
    everywhere = seen(("kubetune-scale-*", f"!{other}"))
    assert [job for job in everywhere if job[0] in (ours, other)] == [(ours, f"seed-{i}") for i in range(5)]
    assert sorted(seen((ours, other))) == sorted([(ours, f"seed-{i}") for i in range(5)]
                                                 + [(other, f"seed-{i}") for i in range(2)])


def test_a_reconcile_reads_memory_not_the_api_server(audited: Plane) -> None:
    namespace = audited.namespace()
    user = USERS[0]
    operator = Operator(audited, user, namespace, KUBETUNE_RESYNC_SECONDS="30")
    operator.start()
    try:
        # Until its first listings are stored the operator reads the API server, by design (a restart must
        # not take an empty cache for "no children"): the jobs come after them.
        wait_for(lambda: operator.text().count("informer: first listing stored") >= len(cache.WATCHED_KINDS),
                 "the operator's first listings", timeout=60)
        names = [f"mem-{index}" for index in range(3)]
        for name in names:
            audited.kube.create_ftj(namespace, finetunejob(name))
        for name in names:
            succeed(audited.kube, namespace, name)
        time.sleep(2)  # the last status writes and the audit log's last batch
    finally:
        operator.stop()
    counts = collections.Counter(f"{e['verb']} {(e.get('objectRef') or {}).get('resource')}"
                                 for e in audited.requests(user))
    reads = {key: value for key, value in counts.items()
             if key.split()[0] == "get" and key.split()[1] in ("finetunejobs", "jobs", "configmaps", "pods",
                                                               "deployments", "services")}
    assert reads == {}, f"reconcile read from the API server: {reads} (all requests: {dict(counts)})"
    per_job_pod_lists = [e["requestURI"] for e in audited.requests(user)
                         if e["verb"] == "list" and "job-name" in e.get("requestURI", "")]
    assert per_job_pod_lists == []
    # Secrets are neither listed nor watched; their metadata, once seen, is remembered.
    assert counts["list secrets"] == counts["watch secrets"] == 0
    assert counts["create secrets"] == len(names)
    assert counts["get secrets"] <= len(names), dict(counts)
    assert counts["create jobs"] == 2 * len(names)
    assert "Traceback" not in operator.text()


def test_a_standby_takes_over_when_the_active_replica_is_killed(audited: Plane) -> None:
    namespace = audited.namespace()
    audited.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubetune-scale",
                                                                        "namespace": namespace}}))
    lifetime = {"KUBETUNE_PEERING_LIFETIME": str(PEERING_LIFETIME)}
    active = Operator(audited, USERS[1], namespace, KUBETUNE_PEERING_PRIORITY="20", **lifetime)
    standby = Operator(audited, USERS[2], namespace, KUBETUNE_PEERING_PRIORITY="10", **lifetime)
    active.start()
    try:
        audited.kube.create_ftj(namespace, finetunejob("before"))
        wait_for(lambda: audited.kube.job(namespace, "before-validate"), "the active replica at work", timeout=120)
        standby.start()
        wait_for(lambda: "Pausing operations" in standby.text(), "the standby pausing", timeout=120)
        audited.kube.run_pod_to_end(namespace, "before-validate", 0, json.dumps({"outcome": "validated"}))
        wait_for(lambda: audited.kube.job(namespace, "before-train"), "the trainer Job (active)", timeout=120)
        assert active.proc is not None
        active.proc.kill()  # SIGKILL: no goodbye in the peering record
        active.proc.wait()
        killed = time.monotonic()
        audited.kube.create_ftj(namespace, finetunejob("after"))
        wait_for(lambda: audited.kube.job(namespace, "after-validate"), "the standby taking over",
                 timeout=PEERING_LIFETIME + 90)
        took_over = time.monotonic() - killed
        assert "Resuming operations" in standby.text()
        audited.kube.run_pod_to_end(namespace, "before-train", 0, json.dumps({"outcome": "succeeded", "step": 3}))
        wait_for(lambda: audited.kube.condition_is(namespace, "before", "Succeeded", "True"), "before Succeeded",
                 timeout=120)
        succeed(audited.kube, namespace, "after")
    finally:
        standby.stop()
        active.stop(signal.SIGKILL)
    print(f"standby took over {took_over:.1f} s after the SIGKILL (peering lifetime {PEERING_LIFETIME} s)")
    # While the active replica lived the standby wrote nothing; each child was created exactly once.
    standby_writes = [e for e in audited.requests(USERS[2])
                      if e["verb"] in ("create", "patch", "update", "delete")
                      and (e.get("objectRef") or {}).get("resource") not in ("kopfpeerings", "events")]
    stamp = time.time() - (time.monotonic() - killed)
    early = [e for e in standby_writes if _epoch(e["stageTimestamp"]) < stamp]
    assert early == [], early
    created = collections.Counter((e["objectRef"]["resource"], e["objectRef"].get("name") or "")
                                  for user in USERS[1:] for e in audited.requests(user)
                                  if e["verb"] == "create" and e["responseStatus"]["code"] == 201
                                  and e["objectRef"].get("resource") in ("jobs", "configmaps", "secrets"))
    assert set(created.values()) == {1}, created
    jobs = {j["metadata"]["name"] for j in audited.kube.plain(audited.kube.batch.list_namespaced_job(namespace))
            ["items"]}
    assert jobs == {"before-validate", "before-train", "after-validate", "after-train"}


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

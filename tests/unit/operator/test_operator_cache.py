"""The operator's watch-fed store: what reconcile reads instead of the API server.

The informers that feed it run against the real API server in
tests/integration/operator/test_operator_cache.py; here, the store's rules.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.operator import cache


def obj(kind: str, name: str, version: str, uid: str = "u1", namespace: str = "ns", **extra: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": version,
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:x": {}}}], **extra.pop("metadata", {})}
    return {"apiVersion": "v1", "kind": kind, "metadata": metadata, **extra}


class TestNewestCopyWins:
    def test_an_older_copy_does_not_replace_a_newer_one(self) -> None:
        store = cache.Store()
        assert store.upsert(cache.JOB, obj("Job", "a", "20", status={"active": 1}))
        assert not store.upsert(cache.JOB, obj("Job", "a", "9", status={"active": 0}))
        assert store.get(cache.JOB, "ns", "a")["status"] == {"active": 1}  # type: ignore[index]
        assert store.upsert(cache.JOB, obj("Job", "a", "21", status={"succeeded": 1}))
        assert store.get(cache.JOB, "ns", "a")["status"] == {"succeeded": 1}  # type: ignore[index]

    def test_resource_versions_compare_as_numbers(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "a", "100"))
        assert not store.upsert(cache.JOB, obj("Job", "a", "99"))  # "99" > "100" as text
        assert cache.newer("100", "99") and not cache.newer("99", "100")

    def test_a_deleted_object_is_not_brought_back_by_a_late_older_copy(self) -> None:
        store = cache.Store()
        store.upsert(cache.POD, obj("Pod", "p", "5"))
        store.remove(cache.POD, obj("Pod", "p", "7"))
        assert not store.upsert(cache.POD, obj("Pod", "p", "6"))  # the other watch, behind
        assert store.get(cache.POD, "ns", "p") is None

    def test_a_recreated_object_of_the_same_name_is_stored(self) -> None:
        store = cache.Store()
        store.upsert(cache.CONFIG_MAP, obj("ConfigMap", "c", "5", uid="old"))
        store.remove(cache.CONFIG_MAP, obj("ConfigMap", "c", "7", uid="old"))
        assert store.upsert(cache.CONFIG_MAP, obj("ConfigMap", "c", "8", uid="new"))
        assert store.get(cache.CONFIG_MAP, "ns", "c")["metadata"]["uid"] == "new"  # type: ignore[index]

    def test_readers_get_their_own_copy(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "a", "1", status={"active": 1}))
        first = store.get(cache.JOB, "ns", "a")
        first["status"]["active"] = 99  # type: ignore[index]
        assert store.get(cache.JOB, "ns", "a")["status"] == {"active": 1}  # type: ignore[index]


    def test_every_lists_one_kind_across_namespaces_and_nothing_deleted(self) -> None:
        store = cache.Store()
        store.upsert(cache.FINETUNEJOB, obj("FineTuneJob", "a", "1", namespace="team-a"))
        store.upsert(cache.FINETUNEJOB, obj("FineTuneJob", "b", "2", namespace="team-b"))
        store.upsert(cache.FINETUNEJOB, obj("FineTuneJob", "gone", "3", namespace="team-b"))
        store.upsert(cache.JOB, obj("Job", "a-train", "4", namespace="team-a"))
        store.remove(cache.FINETUNEJOB, obj("FineTuneJob", "gone", "5", namespace="team-b"))
        found = {(j["metadata"]["namespace"], j["metadata"]["name"]) for j in store.every(cache.FINETUNEJOB)}
        assert found == {("team-a", "a"), ("team-b", "b")}


class TestWhatIsKept:
    def test_managed_fields_are_dropped(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "a", "1"))
        assert "managedFields" not in store.get(cache.JOB, "ns", "a")["metadata"]  # type: ignore[index]

    def test_pods_keep_metadata_status_and_container_resources_but_not_the_rest_of_their_spec(self) -> None:
        store = cache.Store()
        gpu = {"limits": {"nvidia.com/gpu": "2"}, "requests": {"cpu": "4"}}
        pod = obj("Pod", "p", "1", spec={"nodeName": "n1", "containers": [
            {"name": "t", "image": "i", "env": [{"x": "y" * 999}], "resources": gpu}]},
            status={"phase": "Running"})
        store.upsert(cache.POD, pod)
        kept = store.get(cache.POD, "ns", "p")
        # status.usage counts the devices the pod really holds: its containers' resources stay.
        assert kept is not None and kept["status"] == {"phase": "Running"}
        assert kept["spec"] == {"nodeName": "n1", "containers": [{"name": "t", "resources": gpu}]}

    def test_a_finetunejob_is_kept_without_kopfs_copy_of_its_spec_and_nothing_else_is_lost(self) -> None:
        spec = {"model": {"source": "pvc://m"}, "training": {"epochs": 3}}
        annotations = {cache.KOPF_DIFFBASE_ANNOTATION: json.dumps({"spec": spec}), "kubetune.io/kopf-managed": "yes",
                       "team": "a"}
        job = obj("FineTuneJob", "j", "1", metadata={"annotations": annotations, "labels": {"x": "y"}}, spec=spec,
                  status={"phase": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True"}]})
        store = cache.Store()
        store.upsert(cache.FINETUNEJOB, job)
        kept = store.get(cache.FINETUNEJOB, "ns", "j")
        expected = json.loads(json.dumps(job))
        del expected["metadata"]["managedFields"], expected["metadata"]["annotations"][cache.KOPF_DIFFBASE_ANNOTATION]
        assert kept == expected
        # Only FineTuneJobs carry kopf's diffbase; another kind keeps every annotation.
        store.upsert(cache.JOB, obj("Job", "c", "1", metadata={"annotations": annotations}))
        assert store.get(cache.JOB, "ns", "c")["metadata"]["annotations"] == annotations  # type: ignore[index]

    def test_objects_are_stored_compressed_and_read_back_whole(self) -> None:
        status = {"conditions": [{"type": t, "status": "True", "reason": "R", "message": "m" * 40}
                                 for t in ("Validated", "Succeeded", "ServingDisabled")]}
        job = obj("FineTuneJob", "j", "1", spec={"training": {"epochs": 3, "learningRate": 1e-4}}, status=status)
        store = cache.Store()
        store.upsert(cache.FINETUNEJOB, job)
        stored = store._objects[(cache.FINETUNEJOB, "ns", "j")].data
        assert len(stored) < len(json.dumps(cache.trim(cache.FINETUNEJOB, job), separators=(",", ":"))) / 2
        assert store.get(cache.FINETUNEJOB, "ns", "j") == cache.trim(cache.FINETUNEJOB, job)
        assert store.every(cache.FINETUNEJOB) == (cache.trim(cache.FINETUNEJOB, job),)

    def test_a_secret_is_remembered_without_its_data(self) -> None:
        store = cache.Store()
        store.upsert(cache.SECRET, obj("Secret", "s", "1", data={"token": "c2VjcmV0"}, stringData={"k": "v"}))
        kept = store.get(cache.SECRET, "ns", "s")
        assert kept is not None and kept["metadata"]["name"] == "s"
        assert "c2VjcmV0" not in json.dumps(kept) and "data" not in kept and "stringData" not in kept

    def test_a_secret_found_missing_is_not_read_again_within_its_ttl(self) -> None:
        store = cache.Store(secret_ttl=60.0)
        store.note_absent(cache.SECRET, "ns", "s")
        assert store.known_absent(cache.SECRET, "ns", "s")
        store.upsert(cache.SECRET, obj("Secret", "s", "1"))  # created since
        assert not store.known_absent(cache.SECRET, "ns", "s")
        store.note_absent(cache.SECRET, "ns", "t")
        store.forget(cache.SECRET, "ns", "t")  # a create answered 409: it is there after all
        assert not store.known_absent(cache.SECRET, "ns", "t")
        assert not cache.Store(secret_ttl=0.0).known_absent(cache.SECRET, "ns", "s")

    def test_a_remembered_secret_is_forgotten_after_its_ttl(self) -> None:
        store = cache.Store(secret_ttl=0.0)
        store.upsert(cache.SECRET, obj("Secret", "s", "1"))
        assert store.get(cache.SECRET, "ns", "s") is None  # read again: a deleted Secret is noticed


class TestIndexes:
    def test_pods_are_found_by_their_job(self) -> None:
        store = cache.Store()
        for name, job in (("a-1", "j-train"), ("a-2", "j-train"), ("b-1", "j-validate")):
            store.upsert(cache.POD, obj("Pod", name, "1", uid=name,
                                        metadata={"labels": {cache.POD_JOB_LABEL: job}}))
        assert [p["metadata"]["name"] for p in store.pods_of("ns", "j-train")] == ["a-1", "a-2"]
        store.remove(cache.POD, obj("Pod", "a-1", "2", uid="a-1"))
        assert [p["metadata"]["name"] for p in store.pods_of("ns", "j-train")] == ["a-2"]
        assert store.pods_of("other", "j-train") == ()

    def test_list_filters_by_namespace_and_labels(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "t", "1", uid="1", metadata={"labels": {"c": "trainer"}}))
        store.upsert(cache.JOB, obj("Job", "v", "1", uid="2", metadata={"labels": {"c": "validate"}}))
        store.upsert(cache.JOB, obj("Job", "t", "1", uid="3", namespace="x", metadata={"labels": {"c": "trainer"}}))
        assert [j["metadata"]["uid"] for j in store.list(cache.JOB, "ns", {"c": "trainer"})] == ["1"]
        assert len(store.list(cache.JOB, "ns")) == 2

    def test_a_fresh_listing_drops_what_is_gone_in_its_scope_only(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "gone", "1", uid="1"))
        store.upsert(cache.JOB, obj("Job", "kept", "1", uid="2"))
        store.upsert(cache.JOB, obj("Job", "elsewhere", "1", uid="3", namespace="other"))
        store.replace(cache.JOB, [obj("Job", "kept", "2", uid="2")], lambda ns: ns == "ns")
        assert store.get(cache.JOB, "ns", "gone") is None
        assert store.get(cache.JOB, "ns", "kept")["metadata"]["resourceVersion"] == "2"  # type: ignore[index]
        assert store.get(cache.JOB, "other", "elsewhere") is not None
        assert store.size() == {cache.JOB: 2}

    def test_a_fresh_listing_keeps_what_was_stored_from_a_newer_event(self) -> None:
        store = cache.Store()
        store.upsert(cache.FINETUNEJOB, obj("FineTuneJob", "new", "50"))  # kopf's watch, after the listing
        store.upsert(cache.FINETUNEJOB, obj("FineTuneJob", "old", "30", uid="2"))
        store.replace(cache.FINETUNEJOB, [], lambda ns: True, list_version="40")
        assert store.get(cache.FINETUNEJOB, "ns", "new") is not None
        assert store.get(cache.FINETUNEJOB, "ns", "old") is None

    def test_a_name_held_by_someone_else_is_read_directly(self) -> None:
        store = cache.Store()
        assert not store.is_direct(cache.CONFIG_MAP, "ns", "squat-config")
        store.read_directly(cache.CONFIG_MAP, "ns", "squat-config")
        assert store.is_direct(cache.CONFIG_MAP, "ns", "squat-config")


class TestWatchedNamespaces:
    def test_patterns_mean_what_they_mean_to_kopf(self) -> None:
        matches = cache.namespace_matcher(["team-*", "!team-secret"])
        assert matches("team-a") and not matches("team-secret") and not matches("default")
        assert cache.namespace_matcher([])("anything")
        assert not cache.namespace_matcher(["!kube-*"])("kube-system")
        assert cache.namespace_matcher(["!kube-*"])("default")

    def test_plain_names_get_namespaced_watches_patterns_a_cluster_wide_one(self) -> None:
        assert cache.exact_namespaces(["a", "b"]) == ("a", "b")
        assert cache.exact_namespaces(["team-*"]) is None
        assert cache.exact_namespaces(["a", "!b"]) is None
        assert cache.exact_namespaces([]) is None


class TestWatchStream:
    class Response:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
            return iter(self.chunks)

    def test_events_split_across_chunks_are_joined(self) -> None:
        chunks = [b'{"type":"ADDED"}\n{"ty', b'pe":"MODIFIED"}\n\n{"type":', b'"DELETED"}']
        assert [json.loads(line)["type"] for line in cache.lines_of(self.Response(chunks))] == [
            "ADDED", "MODIFIED", "DELETED"]


class TestPagedListing:
    """An informer lists in pages (`limit`/`continue`): one page decoded at a time, not every object at
    once (a peak the allocator keeps), and the store ends up as a listing in one piece would leave it."""

    class Pages:
        """A list call answering `items` in pages of the `limit` it is asked for, as the API server does."""

        class Response:
            def __init__(self, data: bytes) -> None:
                self.data = data

        def __init__(self, items: list[dict[str, Any]], version: str = "40") -> None:
            self.items, self.version = items, version
            self.calls: list[dict[str, Any]] = []

        def __call__(self, **kwargs: Any) -> Any:
            self.calls.append(kwargs)
            start = int(kwargs.get("_continue") or 0)
            end = start + kwargs["limit"] if kwargs.get("limit") else len(self.items)
            page = [{k: v for k, v in item.items() if k != "kind"} for item in self.items[start:end]]
            metadata = {"resourceVersion": self.version, "continue": str(end) if end < len(self.items) else ""}
            return self.Response(json.dumps({"items": page, "metadata": metadata}).encode())

    def test_every_page_is_stored_and_what_no_page_held_is_dropped(self) -> None:
        store = cache.Store()
        store.upsert(cache.JOB, obj("Job", "gone", "1", uid="gone"))
        store.upsert(cache.JOB, obj("Job", "newer", "50", uid="newer"))  # from an event after the listing
        store.upsert(cache.JOB, obj("Job", "elsewhere", "1", uid="x", namespace="other"))
        pages = self.Pages([obj("Job", f"j{i}", "10", uid=f"u{i}") for i in range(5)])
        informer = cache.Informer(cache.JOB, pages, store, lambda ns: ns == "ns", page_size=2)
        assert informer._list() == "40"
        assert [call.get("limit") for call in pages.calls] == [2, 2, 2]
        assert [call.get("_continue") for call in pages.calls] == [None, "2", "4"]
        assert sorted(j["metadata"]["name"] for j in store.list(cache.JOB, "ns")) == [
            "j0", "j1", "j2", "j3", "j4", "newer"]
        assert store.get(cache.JOB, "ns", "j3")["kind"] == "Job"  # type: ignore[index]
        assert store.get(cache.JOB, "other", "elsewhere") is not None  # not in the informer's scope

    def test_an_informer_pages_by_default(self) -> None:
        pages = self.Pages([obj("Job", f"j{i}", "10", uid=f"u{i}") for i in range(3)])
        informer = cache.Informer(cache.JOB, pages, cache.Store(), lambda ns: True)
        informer._list()
        assert pages.calls[0]["limit"] == cache.LIST_PAGE > 0

    def test_page_size_zero_lists_in_one_piece(self) -> None:
        pages = self.Pages([obj("Job", f"j{i}", "10", uid=f"u{i}") for i in range(3)])
        store = cache.Store()
        cache.Informer(cache.JOB, pages, store, lambda ns: True, page_size=0)._list()
        assert len(pages.calls) == 1 and "limit" not in pages.calls[0]
        assert store.size() == {cache.JOB: 3}

    def test_a_relisting_reports_what_changed_or_disappeared_while_no_watch_ran(self) -> None:
        """The informers are the children's only watch: an expired watch (410) must not lose the events of
        its gap, so a relisting reports them. The first listing reports nothing (the start-up resume of
        every FineTuneJob covers what happened before)."""
        store = cache.Store()
        seen: list[tuple[str, str, str]] = []
        first = self.Pages([obj("Job", "kept", "10", uid="k"), obj("Job", "moved", "10", uid="m"),
                            obj("Job", "gone", "10", uid="g", metadata={"labels": {"app": "x"}})])
        informer = cache.Informer(cache.JOB, first, store, lambda ns: True)
        informer.on_event = lambda kind, event, body: seen.append((kind, event, body["metadata"]["name"]))
        informer._list()
        informer.synced.set()  # as `run` does after the first listing
        assert seen == []
        informer.list_call = self.Pages([obj("Job", "kept", "10", uid="k"), obj("Job", "moved", "12", uid="m"),
                                         obj("Job", "new", "11", uid="n")], version="50")
        informer._list()
        assert seen == [("Job", "MODIFIED", "moved"), ("Job", "MODIFIED", "new"), ("Job", "DELETED", "gone")]
        assert store.get(cache.JOB, "ns", "gone") is None


def test_a_repeated_copy_is_not_encoded_again(monkeypatch: Any) -> None:
    """A write's answer is stored, then its watch event brings the same resourceVersion: no second encoding."""
    store = cache.Store()
    encoded: list[int] = []
    real = cache.encode
    monkeypatch.setattr(cache, "encode", lambda body: encoded.append(1) or real(body))
    assert store.upsert(cache.JOB, obj("Job", "j", "5"))
    assert not store.upsert(cache.JOB, obj("Job", "j", "5"))
    assert not store.upsert(cache.JOB, obj("Job", "j", "4"))
    assert len(encoded) == 1


def test_a_new_jobs_secret_is_presumed_missing_once_and_read_after_a_conflict() -> None:
    """A job no pass has finished has no Secret unless a pass died after creating it: no GET to find
    that out. Its create then answers 409, the name is forgotten, and the next observation reads it."""
    store = cache.Store(secret_ttl=60)
    assert store.presume_absent(cache.SECRET, "ns", "j-progress")
    assert store.known_absent(cache.SECRET, "ns", "j-progress")
    store.forget(cache.SECRET, "ns", "j-progress")  # the create answered 409
    assert not store.presume_absent(cache.SECRET, "ns", "j-progress")  # once only: the pass reads it now
    assert not store.known_absent(cache.SECRET, "ns", "j-progress")
    store.upsert(cache.SECRET, obj("Secret", "k-progress", "3"))
    assert not store.presume_absent(cache.SECRET, "ns", "k-progress")  # remembered: nothing to presume

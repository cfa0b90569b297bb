"""The FineTuneSweep's API-server access: read a sweep and its trials, carry out a decision.

Built on `client.KubeClient` (same ApiClient and API objects). Creating a trial
answers 409 when it is already there, which is fine: trial names are
deterministic. A sweep or trial deleted meanwhile (404) is not an error.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from kubernetes.client.exceptions import ApiException

from kubetune.operator import cache
from kubetune.operator.client import KubeClient
from kubetune.operator.sweeps import models as sweep_models, reconcile as sweep

Body = dict[str, Any]
GROUP, VERSION = sweep_models.GROUP, sweep_models.VERSION
SWEEPS = sweep_models.PLURAL
JOBS = "finetunejobs"

log = logging.getLogger(__name__)


class SweepClient:
    """What the sweep handlers need, over the operator's `KubeClient`."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.custom = kube.custom

    def get_sweep(self, namespace: str, name: str) -> Body | None:
        try:
            return cast(Body, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, SWEEPS, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def sweep_names(self, namespaces: tuple[str, ...]) -> list[tuple[str, str]]:
        """(namespace, name) of every sweep in `namespaces` (kopf's patterns): one list per namespace when
        they are plain names, else one cluster-wide list filtered by the patterns. Only metadata is kept."""
        exact = cache.exact_namespaces(namespaces)
        try:
            if exact is not None:
                listings = [cast(Body, self.custom.list_namespaced_custom_object(GROUP, VERSION, n, SWEEPS))
                            for n in exact]
            else:
                listings = [cast(Body, self.custom.list_cluster_custom_object(GROUP, VERSION, SWEEPS))]
        except ApiException as error:
            if error.status == 404:  # the FineTuneSweep CRD is not installed
                return []
            raise
        in_scope = cache.namespace_matcher(namespaces)
        found = [(str(m.get("namespace") or ""), str(m.get("name") or ""))
                 for listing in listings for m in (i.get("metadata") or {} for i in listing.get("items") or [])]
        return [(namespace, name) for namespace, name in found if name and in_scope(namespace)]

    def list_trials(self, sweep_body: Body) -> list[Body]:
        """The sweep's trial FineTuneJobs: labelled with its name and controlled by its uid. From the
        operator's watch-fed cache once it holds the namespace (a sweep pass then reads no API server),
        else one labelled list."""
        metadata = sweep_body["metadata"]
        listing = self.kube.list_finetunejobs(metadata["namespace"], {sweep.LABEL_SWEEP: metadata["name"][:63]})
        owned = []
        for item in listing:
            owners = (item.get("metadata") or {}).get("ownerReferences") or []
            if any(o.get("uid") == metadata["uid"] and o.get("controller") for o in owners):
                owned.append(item)
        return owned

    def apply(self, sweep_body: Body, decision: sweep.SweepDecision) -> None:
        """Write the status (if it changed), then create, prune, stop and (un)serve trials.

        The status goes first because it holds the study log: a trial's `ask` and a pruning `tell`
        must be stored before they take effect, so a crash in between repeats the same action
        instead of asking the sampler again."""
        namespace, name = sweep_body["metadata"]["namespace"], sweep_body["metadata"]["name"]
        if sweep.status_changed(sweep_body.get("status") or {}, decision.status):
            self.patch_sweep_status(namespace, name, decision.status)
        for manifest in decision.create:
            self.create_trial(namespace, manifest)
        for prune in decision.prune:
            self.patch_trial(namespace, prune.name, {"metadata": {"annotations": {
                sweep.ANNOTATION_PRUNED: prune.reason[:1024]}}})
            log.info("pruned trial %s/%s: %s", namespace, prune.name, prune.reason)
        for stop in decision.stop:
            self.patch_trial(namespace, stop.name, {
                "metadata": {"annotations": {sweep.ANNOTATION_STOPPED: stop.reason[:1024]}},
                "spec": {"suspend": True}})
            log.info("stopped trial %s/%s: %s", namespace, stop.name, stop.reason)
        for change in decision.serve:
            self.patch_trial(namespace, change.name, {"spec": {"serving": change.serving}})
            log.info("set serving of trial %s/%s to %s", namespace, change.name, change.serving)

    def create_trial(self, namespace: str, manifest: Body) -> None:
        try:
            created = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, JOBS, manifest)
            self.kube.remember(cache.FINETUNEJOB, cast(Body, created))  # the next pass lists it, even before its watch event
            log.info("created trial %s/%s", namespace, manifest["metadata"]["name"])
        except ApiException as error:
            if error.status != 409:
                raise

    def patch_trial(self, namespace: str, name: str, patch: Body) -> None:
        try:
            self.kube.remember(cache.FINETUNEJOB, cast(Body, self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, JOBS, name, patch)))
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_sweep_status(self, namespace: str, name: str, status: Body) -> None:
        """Merge-patch `status` of a FineTuneSweep (the status subresource)."""
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, SWEEPS, name,
                                                              {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise

"""`python -m kubetune.operator`: run the operator (kopf handlers + the progress/metrics server).

Configuration comes from `KUBETUNE_*` environment variables (see `settings`);
API access from the pod's service account, or KUBECONFIG outside a cluster.
"""

from __future__ import annotations

import logging
import os


def main() -> None:
    logging.basicConfig(level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from kubetune.operator.jobs import handlers
    from kubetune.operator.runtime import RUNTIME
    from kubetune.operator.sweeps import handlers as sweep_handlers

    settings = RUNTIME.settings
    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=os.environ.get("KUBETUNE_LIVENESS_ENDPOINT") or None,
    )


if __name__ == "__main__":
    main()

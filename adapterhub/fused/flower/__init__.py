"""FUSED on Flower: the ``--engine flower`` deployment of ``fed train`` and ``unlearn`` (docs/federated.md).

* :mod:`.node` — what a site runs: its node config (client id, base folder, data) and the
  ``flower-supernode`` command line of ``adapterhub fed node`` (no torch, no flwr at import).
* :mod:`.client_app` — the ClientApp each SuperNode runs: it loads the node's own rows, refuses data
  of another task, and answers ``query`` (identity, sizes), ``train`` (one
  :func:`~adapterhub.fused.federated.client_update`, the same function the local engine calls) and
  ``evaluate`` (counts and scores, never rows).
* :mod:`.server_app` — the ServerApp the SuperLink runs: the local engine's own code
  (:func:`~adapterhub.fused.federated.global_model`, :func:`~adapterhub.fused.unlearning.run_unlearning`)
  with a round runner that sends messages instead of calling clients in process; it writes its result
  into the coordinator's outbox folder and never touches a catalog.
* :mod:`.coordinator` — the coordinator's side: writes the request, starts the run through the
  SuperLink's Control API, waits for it, reads the outbox as untrusted input and registers it.
* :mod:`.wire` — state tensors to Flower records and back, and bytes counted from the messages.
"""

"""The library seam: stored teacher targets inside a user's own training loop.

- :mod:`~softlabels.library.pairing`: :func:`with_targets` pairs any map-style dataset (a torch
  ``Dataset`` or a Hugging Face ``datasets.Dataset``) with its store by sample id, item by item;
- :mod:`~softlabels.library.batches`: :func:`collate` makes ``(user batch, typed targets)``, and
  :class:`TokenTargets` carries a token store's targets beside a batch of sequences;
- :mod:`~softlabels.library.losses`: :func:`kd_loss`, one function per divergence and the
  :class:`KDLoss` module, over typed targets; they call the same loss modules as
  ``softlabels train`` and raise errors that name Python arguments.

Nothing here is used by the command line: it sits above :mod:`softlabels.evaluation` and
below :mod:`softlabels.cli` in the import order (docs/ARCHITECTURE.md).
"""

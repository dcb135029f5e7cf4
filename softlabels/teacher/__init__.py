"""The teacher job: resolve a model spec, run it once over the inputs and write a store.

Owns model specs (built-in, ``module:factory``, TorchScript, ``.pt2``, ``hf:``), the built-in
classifier and language-model architectures, the job runner (lock, plan, resume, repair,
ranks), the producers per position kind, and the stores written from stores (``merge``,
``upgrade``). May import :mod:`softlabels.store` and everything below it.
"""

"""The store: the on-disk format and everything that reads or writes it (docs/FORMAT.md).

Owns the schema (positions × layouts), the HDF5 and Zarr backends, the unit writer and the
one reader (format 2, and format 1 through its adapter), the layouts (``dense``, ``topk``,
``sampled``: encode, decode to typed targets, validate) and position kinds (``sample``,
``views``, ``tokens``), ensembles read as one store, and ``inspect``. Zarr stores may live at
URLs (``location``: what a path names; ``remote``: opening one through fsspec with retries and a
cache; ``readahead``: streaming from far away); ``lock``: one writer per store (a flock, or a lease at
a URL). Knows no teacher and no student. May import :mod:`softlabels.inputs`, :mod:`softlabels._runtime` and :mod:`softlabels.errors`.
"""

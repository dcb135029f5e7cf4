"""Inputs: what a teacher or a student reads, before any teacher has run.

Owns in-memory and file arrays (``.npz``, ``.npy``, HDF5, Zarr), the built-in digits, image
folders, text and token data, the rule for which files may be read (regular files, links kept in
an image folder), the ``--data`` spec grammar and fingerprints, the loader that
moves batches out of DataLoader workers, and the augmentation ops whose parameters a views
store records. May import :mod:`softlabels._runtime` and :mod:`softlabels.errors` only.
"""

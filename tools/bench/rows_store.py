"""The table's store rows: the reader against the storage libraries, memcpy and a per-sample-file cache,
and what each layout costs on disk per position.

* ``reader``: ``SoftLabelDataset`` (in-process, shuffled, batch 256, checksums on) over a dense float16
  classifier store, against the storage library's own whole-chunk reads of the same arrays
  (``h5py`` ``read_direct``; ``zarr`` ``get_basic_selection(out=)``) and against memcpy of the same bytes
  between resident arrays (``bench_dataset``'s baselines); CPU seconds, a time ratio each.
* ``cache``: the same reader against the peer design, one ``torch.save`` file per sample read back
  in shuffled order (on a few thousand samples): CPU seconds per sample.
* ``bytes``: bytes on disk per real token of a token store at V = 4,096 in each layout (top-k K = 32,
  sampled S = 12, sampled ids only), against dense float16 (``bench_lm_generate.layout_bytes``); HDF5
  and Zarr, uncompressed. Not a timing: one measurement, no rounds.
"""

from __future__ import annotations

from pathlib import Path

from pairs import cpu, paired

CLASSES = 1000


def _reader_stores(tmp: Path, rows: int) -> dict:
    """The dense float16 store (HDF5 and Zarr) and its arrays in memory, written once per temp dir."""
    import bench_dataset as bd

    data = bd.rows(rows, CLASSES)
    paths = {b: tmp / f"reader{rows}.{b}" for b in ("h5", "zarr")}
    for path in paths.values():
        if not path.exists():
            bd.write_store(path, data, CLASSES, 256)
    return {"data": data, "paths": paths}


def _stream(path: Path):
    """One epoch of the dataset over ``path`` (shuffled, batch 256, checksums on), a new epoch each call."""
    from softlabels.student.dataset import SoftLabelDataset

    ds = SoftLabelDataset([(path, None)], batch_size=256, shuffle=True, verify=True)

    def run() -> int:
        ds.set_epoch(ds.epoch + 1)
        return sum(len(b["labels"]) for b in ds)
    return run


def row_reader(tmp: Path, rounds: int, rows: int) -> dict:
    """Three sub-rows: the dataset / plain h5py, / plain zarr, / memcpy; CPU time ratios."""
    import bench_dataset as bd

    from softlabels.store.reader import UnitStore

    s = _reader_stores(tmp, rows)
    data, paths = s["data"], s["paths"]
    with UnitStore(paths["h5"]) as store:
        bufs = bd.chunk_buffers(data, store.meta.chunk_samples)
    size = f"{rows:,} x C = {CLASSES:,} float16 dense, batch 256"
    common = {"clock": "cpu", "goal": "none set", "note": "time ratio: dataset / baseline"}
    return {
        "reader_h5py": {"title": "reader (HDF5 store) / plain h5py whole-chunk reads, time", "size": size, **common,
                        **paired(cpu(_stream(paths["h5"])), cpu(lambda: bd.plain_pass(paths["h5"], rows, bufs)),
                                 rounds)},
        "reader_zarr": {"title": "reader (Zarr store) / plain zarr whole-chunk reads, time", "size": size, **common,
                        **paired(cpu(_stream(paths["zarr"])), cpu(lambda: bd.plain_pass(paths["zarr"], rows, bufs)),
                                 rounds)},
        "reader_memcpy": {"title": "reader (HDF5 store) / memcpy of the same bytes, time", "size": size, **common,
                          **paired(cpu(_stream(paths["h5"])), cpu(lambda: bd.memcpy_pass(data, bufs)), rounds)},
    }


def row_cache(tmp: Path, rounds: int, rows: int, files: int) -> dict:
    """CPU seconds per sample: the dataset over the HDF5 store vs one ``torch.save`` file per sample."""
    import bench_dataset as bd

    s = _reader_stores(tmp, rows)
    bd.write_sample_files(tmp / "per-sample", s["data"], files)
    return {"size": f"{rows:,} rows (store) and {files:,} files (cache) x C = {CLASSES:,} float16, batch 256",
            "clock": "cpu", "goal": "none set",
            **paired(cpu(_stream(s["paths"]["h5"]), per=rows),
                     cpu(lambda: bd.read_sample_files(tmp / "per-sample", files), per=files), rounds),
            "note": "time per sample: dataset / per-sample files (torch.load, shuffled)"}


def row_bytes(tmp: Path, rounds: int, seqs: int) -> dict:
    """Bytes on disk per real token by layout at V = 4,096, against dense float16; HDF5 and Zarr."""
    import bench_lm_generate as lmg
    import numpy as np

    from softlabels.store.layouts import make_layout

    vocab, seq_len = 4096, 128
    teacher, h = lmg.calibrated(vocab, seq_len, 2.5, lmg.data(2, seq_len, vocab).get_batch(np.arange(2)).ids)
    stores = (("h5", False), ("zarr", False))
    cases = {"dense": ("dense float16", {}), "topk": ("top-k K = 32", {"k": 32}),
             "sampled": ("sampled S = 12", {"samples": 12, "seed": 0}),
             "ids": ("sampled S = 12, ids only", {"samples": 12, "seed": 0, "logits": False})}
    measured = {}
    for key, (label, params) in cases.items():
        layout = make_layout("dense" if key == "dense" else "topk" if key == "topk" else "sampled",
                             num_classes=vocab, logits_dtype="float16", **params)
        per_token, uniq = lmg.layout_bytes(teacher, layout, seqs, seq_len, 16, tmp, stores)
        measured[key] = {"label": label, "layout_bytes": layout.bytes_per_position, "hdf5": per_token[0],
                         "zarr": per_token[1], "unique_ids": uniq}
    dense = measured["dense"]
    size = f"{seqs} x {seq_len} tokens, V = {vocab:,}, teacher entropy ~{h:.1f} nats"
    out = {}
    for key, m in measured.items():
        if key == "dense":
            continue
        r = [m["hdf5"] / dense["hdf5"], m["zarr"] / dense["zarr"]]
        out[f"bytes_{key}"] = {
            "title": f"bytes per token on disk, {m['label']} / dense float16",
            "size": f"{size}; {m['hdf5']:,.1f} B/token (HDF5), {m['zarr']:,.1f} (Zarr), {m['layout_bytes']} in the "
                    f"layout, against {dense['hdf5']:,.0f}, {dense['zarr']:,.0f}, {dense['layout_bytes']}",
            "clock": "bytes",
            "goal": "none set", "ratio": r[0], "min": min(r), "max": max(r), "ratios": r,
            "bytes_per_token": {k: m[k] for k in ("layout_bytes", "hdf5", "zarr", "unique_ids")},
            "dense_bytes_per_token": {k: dense[k] for k in ("layout_bytes", "hdf5", "zarr")},
            "note": "ratio: HDF5's; range: HDF5 and Zarr (uncompressed)"}
    return out

"""``softlabels inspect``: describe a store."""

from __future__ import annotations

import json

import click

from softlabels.cli.storage import storage_option


_REASONS = 20  # bad units listed in the table


@click.command("inspect", short_help="Describe a store: status, sizes, labels and teacher statistics.")
@click.argument("store", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--verify", is_flag=True,
              help="Read every chunk and check its checksum and values; list each bad one with its problem, "
                   "and exit with status 1 when any is bad.")
@storage_option
def command(store: str, as_json: bool, verify: bool) -> None:
    """Describe STORE: format, layout, sizes, status, labels and teacher statistics."""
    from softlabels.store.format import chunk_list
    from softlabels.store.summary import summarize

    info = summarize(store, verify=verify)
    corrupt = bool(verify and info["corrupt_chunks"])
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        raise SystemExit(1 if corrupt else 0)
    k = f"  K={info['topk']}" if info["topk"] else ""
    rows = [
        ("store", f"{info['path']}  ({info['backend']}, format v{info['format_version']})"),
        ("status", info["status"] + (f"  missing chunks: {chunk_list(info['missing_chunks'])}" if info["missing_chunks"] else "")),
        ("layout", f"{info['layout']}  {info['logits_dtype']}  N={info['num_samples']}  C={info['num_classes']}{k}"),
        ("temperatures", "any T" if info.get("temperatures") is None else
         "T = " + ", ".join(f"{t:g}" for t in info["temperatures"]) + " only (exactly what the store records)"),
        ("chunking", f"{info['chunk_rows']} samples per chunk, {info['num_chunks']} write units"
                     + (f", shards of {info['shard_rows']} rows" if info["shard_rows"] else "")),
        *_position_rows(info),
        ("labels", f"{info['labeled']} labeled, {info['unlabeled']} unlabeled"),
        ("teacher accuracy", _pct(info["teacher_accuracy"]) + "  (argmax vs label, labeled rows)"),
        ("teacher entropy", _num(info["mean_teacher_entropy"]) + " nats/row"
                            + (f"  ({info['entropy_note']})" if info["entropy_note"] else "")),
        *[(f"mean {k.replace('_', ' ')}", _num(v) + f" per {info['stats_over'][:-1]}")
          for k, v in sorted(info["teacher_stats"].items())],
        ("size on disk", f"{info['size_on_disk_bytes'] / 2**20:.2f} MiB"),
        ("teacher", json.dumps(info["teacher"], sort_keys=True)),
        ("source", json.dumps(info["source"], sort_keys=True)),
        ("created by", json.dumps(info["created_by"], sort_keys=True)),
    ]
    if info["nonfinite_rows"]:
        rows.append(("non-finite", f"{info['nonfinite_rows']} rows hold NaN/inf teacher values (training on them "
                                   "gives a NaN loss; see created_by.nonfinite_sample_ids)"))
    if verify:
        bad = info["corrupt_chunks"]
        rows.append(("checksums", f"corrupt chunks ({len(bad)}): {chunk_list(bad)} (repair: softlabels generate "
                                  "--repair with the original arguments)" if bad else "all chunks verified"))
    elif info["unreadable_chunks"]:
        rows.append(("damaged", f"chunks {chunk_list(info['unreadable_chunks'])} cannot be read (run with --verify)"))
    if verify:  # one row per bad unit, with its first problem
        rows += [(f"  unit {u}", why) for u, why in list(info["corrupt_reasons"].items())[:_REASONS]]
        if len(info["corrupt_reasons"]) > _REASONS:
            rows.append(("  ...", f"{len(info['corrupt_reasons']) - _REASONS} more (--json lists every one)"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    if corrupt:  # a script or CI step must see a damaged store (the table above says which chunks)
        raise SystemExit(1)


def _position_rows(info: dict) -> list[tuple[str, str]]:
    """Positions (and views), bytes per stored teacher output."""
    rows = [("positions", f"{info['positions']}: {info['num_positions']:,} teacher outputs, "
                          f"{info['bytes_per_position']} B each")]
    if info["views"]:
        v = info["views"]
        rows.append(("views", f"V={v['count']}  augment '{v.get('augment', '')}'  seed {v.get('seed')}  "
                              f"{info['bytes_per_view']} B per view with its {len(v['param_names'])} parameters"))
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

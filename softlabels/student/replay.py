"""What training needs from a format-2 store beyond its batches: the loss check, views replay, identity.

- :func:`check_loss`: the loss a run uses on a layout (``--loss`` or the layout's
  ``default_loss``), refused when it does not fit the layout's targets.
- :func:`replay_op`: a views store's recorded augmentation, built from its spec (built-in
  ops only: a store is data, and code it names is never imported), which the trainer
  applies on the device to each batch's inputs with its ``view_params``.
- :func:`spread_views`: a batch of k views per sample (``--views-per-sample``) as B·k rows.
- :func:`v2_identity`: what ``--resume`` compares to know a store is the one a run used.
"""

from __future__ import annotations

import hashlib
from typing import Any

from softlabels.errors import ConfigError, CorruptStore, UnsupportedFormat

__all__ = ["check_loss", "replay_op", "spread_views", "v2_identity", "valid_losses"]

_DENSE_ONLY = ("kl", "soft_ce", "mse")


def valid_losses(layout: str) -> list[str]:
    """Every loss name that takes ``layout``'s targets: its own forward KL (the default) and every divergence."""
    from softlabels.store.layouts import LAYOUTS
    from softlabels.student.losses import LOSSES, _Divergence

    divergences = [n for n, cls in LOSSES.items() if issubclass(cls, _Divergence)]
    own = list(_DENSE_ONLY) if layout == "dense" else [LAYOUTS[layout].default_loss]
    return own + divergences


def check_loss(loss: str | None, layout: str, where: str) -> str:
    """``loss`` (default: the layout's ``default_loss``) if it fits ``layout``; else a one-line error."""
    from softlabels.store.layouts import LAYOUTS

    name = loss or LAYOUTS[layout].default_loss
    if name in valid_losses(layout):
        return name
    if layout == "topk" and name in _DENSE_ONLY:
        raise ConfigError(f"loss {name!r} needs dense teacher logits but {where} holds top-k logits; "
                          "use --loss topk_kl")
    if layout == "dense" and name == "topk_kl":
        raise ConfigError(f"loss 'topk_kl' is for top-k stores but {where or 'the teacher'} gives dense "
                          "logits; use --loss kl, soft_ce or mse")
    from softlabels.student.losses import LOSSES

    if name not in LOSSES:
        return name  # make_soft_loss names the choices
    raise ConfigError(f"loss {name!r} does not take the {layout} targets of {where or 'the teacher'}; use --loss "
                      f"{' or '.join(valid_losses(layout))}")


def replay_op(dataset: Any, input_shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """A views dataset's augmentation op (or None for an empty spec) and the shape of one view."""
    from softlabels.inputs.augment import parse_augment, view_shape

    spec = dataset.augment
    if not spec:
        return None, input_shape
    path = dataset.stores[0].path
    user = [t.strip() for t in spec.split("+") if ":" in t]
    if user:
        raise UnsupportedFormat(f"{path} records the augmentation '{spec}', whose term '{user[0]}' names code; "
                                "code named in a store is never imported, so training replays built-in ops only; "
                                "generate the views with built-in ops (docs/VIEWS.md)")
    aug = parse_augment(spec)
    params = dataset.stores[0].param_count
    if aug.num_params != params:
        raise CorruptStore(f"{path} holds {params} view parameters per view but its augmentation '{spec}' takes "
                           f"{aug.num_params}; regenerate the store")
    return aug, view_shape(aug, input_shape)


def spread_views(batch: dict[str, Any], k: int, layout: Any) -> dict[str, Any]:
    """A batch of B samples with k views each (``[B, k, ...]`` teacher arrays, ``view``, ``view_params``) as
    B·k rows, sample by sample: the per-view arrays flattened, everything per sample (``x``, labels, ids)
    repeated k times. Done on the device, so the input crosses from the loader once per sample."""
    import torch

    from softlabels.store.positions.views import VIEW_PARAMS
    from softlabels.student.sources import VIEW

    per_view = {*layout.arrays(), VIEW_PARAMS, VIEW}
    out = {}
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[key] = v
        elif key in per_view:
            out[key] = v.reshape(v.shape[0] * k, *v.shape[2:])
        else:
            out[key] = v.repeat_interleave(k, 0)
    return out


def v2_identity(store: Any) -> dict[str, Any]:
    """A format-2 source's identity: its teacher, layout and a digest of its units' checksums."""
    meta = store.meta
    # an ensemble has no checksums of its own: its attributes say enough
    sums = store.unit_checksums().astype("<u4").tobytes() if hasattr(store, "unit_checksums") else b""
    return {"teacher": meta.teacher, "layout": meta.layout, "logits_dtype": meta.logits_dtype,
            "num_samples": meta.num_samples, "num_classes": meta.num_classes, "positions": meta.positions,
            "layout_params": dict(meta.layout_params), "views": meta.views,
            "checksums_sha256": hashlib.sha256(sums).hexdigest()}

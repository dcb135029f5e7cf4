"""What training needs from a store beyond its batches: the loss check and the views replay.

:func:`check_loss` refuses a loss that does not fit a layout's targets; :func:`replay_op` builds a
views store's recorded augmentation (built-in ops only: code a store names is never imported), which
the trainer applies on the device to each batch's inputs with their ``view_params``.
"""

from __future__ import annotations

from typing import Any

from softlabels.errors import ConfigError, CorruptStore, UnsupportedFormat

__all__ = ["check_loss", "replay_op", "valid_losses"]

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
    params = dataset.kind.params
    if aug.num_params != params:
        raise CorruptStore(f"{path} holds {params} view parameters per view but its augmentation '{spec}' takes "
                           f"{aug.num_params}; regenerate the store")
    return aug, view_shape(aug, input_shape)

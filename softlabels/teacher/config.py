"""The frozen configs of ``softlabels generate``, ``merge`` and ``upgrade``: every option, its
default and its valid choices, which the command line reads from here; no torch or numpy, so
``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softlabels._runtime.options import bound_problems, is_number
from softlabels._runtime.paths import out_overlaps
from softlabels.errors import ConfigError
from softlabels.store.location import store_location
from softlabels.store.temperatures import DEFAULT_TAIL_TEMPERATURES, TAIL_T_RANGE, grid_problems, parse_grid

# Choices. LAYOUTS equals softlabels.store.layouts.LAYOUTS' keys and LOGITS_DTYPES softlabels.store.format's
# (tests/test_firstuse.py checks both): those modules need numpy and torch.
LAYOUTS = ("dense", "topk", "sampled")
LOGITS_DTYPES = ("float32", "float16", "bfloat16")
AMP_MODES = ("none", "bf16", "fp16")
ON_NONFINITE = ("error", "record")
ENSEMBLE_MODES = ("arithmetic", "geometric")  # softlabels.store.ensemble.MODES (checked by a test)
DEFAULT_ENSEMBLE_MODE = "arithmetic"


MAX_VIEWS = 65_536
"""Most views per sample a store takes (FKD stores 500 crops, ImageNet+ up to 400)."""

DEFAULT_SAMPLES = 12
"""Draws per output of the sampled layout when ``samples`` is not given: Anshumann et al. found
S = 12 enough, and here it trained within ~1 % of dense KD at 37.5 B/token (docs/TOKENS.md)."""

_CHOICES = {"layout": LAYOUTS, "dtype": LOGITS_DTYPES, "amp": AMP_MODES, "on_nonfinite": ON_NONFINITE}
_LAYOUT_ONLY = {"topk": "topk", "samples": "sampled", "tail_temperatures": "topk",
                "sample_temperature": "sampled", "sampled_ids_only": "sampled"}
"""Options only one layout reads: given with another layout, each is refused, never ignored."""


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Every option of ``softlabels generate`` (validated by :meth:`problems`).

    ``num_classes`` left ``None`` is the teacher's output width; ``progress=None``
    shows a bar on a terminal and periodic one-line progress otherwise. ``layout=None``
    is ``dense``, or ``topk`` with K = 5 for views (docs/VIEWS.md). ``samples=None`` with
    ``layout="sampled"`` is :data:`DEFAULT_SAMPLES`. ``threads`` sets torch's CPU threads (0: torch's
    default). A built-in teacher needs ``weights``, or ``random_teacher`` (seeded by ``seed``, recorded).
    """

    teacher: str
    data: str
    out: str | Path  # a local path, or a store's URL
    weights: str | None = None
    allow_pickle: bool = False
    random_teacher: bool = False
    seed: int = 0
    layout: str | None = None
    topk: int | None = None
    samples: int | None = None
    views: int | None = None
    augment: str | None = None
    views_from: str | None = None
    dtype: str = "float32"
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    threads: int = 1
    amp: str = "none"
    chunk_rows: int | None = None
    shard_chunks: int | None = None
    num_classes: int | None = None
    overwrite: bool = False
    on_nonfinite: str = "error"
    repair: bool = False
    progress: bool | None = None
    # token data (softlabels.teacher.tokens): window length and tokenizer
    seq_len: int | None = None
    tokenizer: str | None = None
    compress: bool = False  # zstd (Zarr) / gzip + shuffle (HDF5) on the sparse layouts' arrays
    # top-k: the temperatures whose tail logsumexp is recorded ("1,2,4" or a tuple; None: the default grid)
    tail_temperatures: str | tuple[float, ...] | None = None
    sample_temperature: float | None = None  # sampled: the draw temperature Td (None: 1)
    sampled_ids_only: bool = False  # sampled: store every draw's id only (no counts, logits, logsumexp)

    def __post_init__(self) -> None:
        if self.layout is None:  # views: top-k with a small K (docs/VIEWS.md); else every logit
            object.__setattr__(self, "layout", "topk" if self.viewed else "dense")
        if self.layout == "sampled" and self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES)
        for name in ("weights", "views_from", "tokenizer"):  # paths are recorded as strings
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, str(value))
        object.__setattr__(self, "out", store_location(self.out))

    def problems(self) -> list[str]:
        from softlabels.inputs.spec import data_spec_path
        from softlabels.teacher.models import BUILTIN_MODELS
        from softlabels.teacher.spec import is_model_file

        p = []
        if self.teacher in BUILTIN_MODELS and self.weights is None and not self.random_teacher:
            p.append(f"--teacher {self.teacher} is an architecture without --weights, so it would label the data "
                     "with random weights; pass --weights FILE (e.g. a 'softlabels train' run's model.pt), or "
                     "--random-teacher for a random teacher seeded by --seed (for tests)")
        if self.random_teacher and self.weights is not None:
            p.append("--random-teacher and --weights exclude each other; pick one")
        for name, choices in _CHOICES.items():
            if (value := getattr(self, name)) not in choices:
                flag = name.replace("_", "-")
                p.append(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.layout == "topk" and (self.topk < 1 if self.topk is not None else not self.viewed):
            p.append("--layout topk needs --topk K with K >= 1")  # views default to K = min(5, C)
        if self.compress and self.layout == "dense":
            p.append("--compress is for the top-k and sampled layouts (dense logits compress ~1.1x); drop --compress")
        p += self._views_problems()
        if self.on_nonfinite == "record" and self.layout == "sampled":
            p.append("--on-nonfinite record keeps non-finite logits as they are, which a sampled store cannot hold "
                     "(its draws need a finite distribution); use --layout dense or topk to record them")
        p += bound_problems(">=", 1, {"batch_size": self.batch_size})
        sizes = ("chunk_rows", "shard_chunks", "num_classes", "seq_len")
        p += bound_problems(">=", 1, {name: getattr(self, name) for name in sizes}, optional=True)
        p += bound_problems(">=", 0, {"num_workers": self.num_workers})
        p += bound_problems("an integer >=", 0, {"threads": self.threads})
        p += out_problems(self.out, [("--data", data_spec_path(self.data)), ("--weights", self.weights),
                                     ("--teacher", self.teacher if is_model_file(self.teacher) else None),
                                     ("--views-from", self.views_from)])
        if self.shard_chunks is not None and str(self.out).lower().endswith((".h5", ".hdf5")):
            p.append("--shard-chunks needs a Zarr store (*.zarr)")
        if self.repair and self.overwrite:
            p.append("--repair and --overwrite contradict each other (repair keeps the good chunks); pick one")
        return p

    def _views_problems(self) -> list[str]:
        """The options of views and of the sparse layouts, and how they fit together."""
        p = []
        if self.views is not None and not 1 <= self.views <= MAX_VIEWS:
            p.append(f"--views must lie in 1..{MAX_VIEWS}, got {self.views}")
        if self.views is not None and self.augment is None and self.views_from is None:
            p.append("--views needs --augment SPEC (how each view is drawn) or --views-from STORE; e.g. "
                     "--augment 'crop(32,padding=4)+flip'")
        if self.augment is not None and self.views is None and self.views_from is None:
            p.append("--augment needs --views V (views per sample); e.g. --views 8")
        if self.layout == "sampled" and self.samples < 1:
            p.append(f"--samples must be >= 1 (draws per output; default {DEFAULT_SAMPLES}), got {self.samples}")
        for name, layout in _LAYOUT_ONLY.items():
            value = getattr(self, name)  # not given: None, or False for a flag
            if value is not None and value is not False and self.layout in LAYOUTS and self.layout != layout:
                p.append(f"--{name.replace('_', '-')} is only for --layout {layout}")
        if self.tail_temperatures is not None:
            try:
                self.grid()
            except ConfigError as err:
                p += err.problems
        t, (low, high) = self.sample_temperature, TAIL_T_RANGE
        if t is not None and (not is_number(t) or not low <= t <= high):
            p.append(f"--sample-temperature must be between {low:g} and {high:g}, got {t!r}; pass e.g. 1")
        return p

    def grid(self) -> tuple[float, ...]:
        """The top-k tail grid: ``--tail-temperatures`` parsed, or the default (1, 2, 4)."""
        g = self.tail_temperatures
        if g is None:
            return DEFAULT_TAIL_TEMPERATURES
        if isinstance(g, str):
            return parse_grid(g)
        if problems := grid_problems(list(g)):
            raise ConfigError(problems)
        return tuple(float(t) for t in g)

    @property
    def viewed(self) -> bool:
        return self.views is not None or self.views_from is not None

    def layout_params(self, default_k: int | None = None) -> dict[str, Any]:
        """``make_layout``'s parameters for ``--layout``: K (``default_k`` when ``--topk`` is not given) and the
        tail grid, or S, the draws' seed, the draw temperature and whether logits are kept."""
        if self.layout == "topk":
            return {"k": self.topk or default_k, "tail_temperatures": list(self.grid())}
        if self.layout == "sampled":
            out: dict[str, Any] = {"samples": self.samples, "seed": self.seed}
            if self.sample_temperature not in (None, 1):  # absent: T = 1, as stores written before it
                out["temperature"] = float(self.sample_temperature)
            if self.sampled_ids_only:
                out["logits"] = False
            return out
        return {}


# -- ensembles (softlabels.store.ensemble; docs/ENSEMBLES.md) ------------------------------------------
def ensemble_problems(stores: tuple[str, ...], mode: str, weights: tuple[float, ...] | None, flag: str) -> list[str]:
    """Problems with an ensemble's options that need no store opened."""
    p = []
    if len(stores) < 2:
        p.append(f"an ensemble needs at least 2 {flag}, got {len(stores)}; pass one {flag} per teacher's store")
    if mode not in ENSEMBLE_MODES:
        p.append(f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
    if weights is not None and len(weights) != len(stores):
        p.append(f"{len(weights)} ensemble weights for {len(stores)} stores; give one weight per store, in order")
    elif weights is not None:
        from softlabels.store.ensemble.combination import weight_problems

        p += weight_problems(weights)
    return p


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """Every option of ``softlabels merge``. ``temperature`` None: the training default T for dense and
    top-k stores (the arithmetic mean is exact at the T it is made for), 1 for sampled ones."""

    stores: tuple[str, ...]
    out: str
    mode: str = DEFAULT_ENSEMBLE_MODE
    weights: tuple[float, ...] | None = None
    temperature: float | None = None
    overwrite: bool = False

    def problems(self) -> list[str]:
        p = ensemble_problems(self.stores, self.mode, self.weights, "--store")
        if self.temperature is not None:
            p += bound_problems("a number >", 0, {"temperature": self.temperature})
        out = Path(self.out).resolve()
        if any(Path(s).resolve() == out for s in self.stores):
            p.append(f"--out {self.out!r} is also a --store; write the merged store to a new path")
            return p + out_problems(self.out, [])
        return p + out_problems(self.out, [("--store", str(s)) for s in self.stores])


@dataclass(frozen=True, kw_only=True)
class UpgradeConfig:
    """Every option of ``softlabels upgrade``: a format-1 ``store`` and the format-2 store ``out`` to write."""

    store: str
    out: str
    overwrite: bool = False

    def problems(self) -> list[str]:
        return out_problems(self.out, [("STORE", self.store)])


def out_problems(out: str | Path, inputs: list[tuple[str, str | None]]) -> list[str]:
    """A store ``--out``: its suffix names a backend, and it is not, holds or lies inside an input."""
    p = [] if Path(out).suffix.lower() in (".h5", ".hdf5", ".zarr") else \
        [f"--out must end in .h5, .hdf5 or .zarr, got {str(out)!r}"]
    return p + [clash] if (clash := out_overlaps(out, inputs)) else p

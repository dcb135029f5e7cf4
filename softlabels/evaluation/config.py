"""The frozen config of ``softlabels eval`` and the report formats. Imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

REPORT_FORMATS = ("md", "html")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Every option of ``softlabels eval``."""

    checkpoint: str
    data: str
    store: str | None = None
    batch_size: int = 512
    device: str = "auto"
    threads: int = 1

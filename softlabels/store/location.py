"""Where a store lives: a local path, or a URL on object storage (``s3://``, ``gs://``, ``memory://``, ...).

A URL is opened through fsspec with *storage options* (docs/FORMAT.md, "Stores at URLs"); they live
in this process only, and messages name the URL, never them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from softlabels._runtime.paths import is_url, resolved
from softlabels.errors import ConfigError, StoreNotFound

__all__ = ["is_url", "parse_storage_options", "resolved", "set_storage_options", "storage_options",
           "store_location"]

_OPTIONS: dict[str, Any] = {}
# fsspec protocols whose filesystem lives in another package: the package to name when it is missing
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub"}


def store_location(path: str | os.PathLike[str]) -> str | Path:
    """A local store's :class:`~pathlib.Path` (``file://`` URLs too), or a remote store's URL, unchanged
    but for trailing slashes."""
    if isinstance(path, str):
        if path.lower().startswith("file://"):
            return Path(path[len("file://"):])
        if is_url(path):
            return path.rstrip("/")
    return Path(path)


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", "client_kwargs.region_name=eu-west-1"]`` -> keyword arguments for the filesystem.

    Values ``true``/``false`` become booleans and integers ints; a dotted key nests a dict.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option {item.split('=', 1)[0]!r} is not KEY=VALUE; write e.g. "
                              "--storage-option endpoint_url=http://127.0.0.1:9000")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", raw):
            value = int(raw)
        *parents, leaf = key.strip().split(".")
        node = options
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return options


def set_storage_options(options: dict[str, Any]) -> None:
    """The storage options every store URL of this process (and its forked workers) is opened with."""
    _OPTIONS.clear()
    _OPTIONS.update(options)


def storage_options(url: str) -> dict[str, Any]:
    """The filesystem keyword arguments for ``url``: :func:`set_storage_options`'s, plus for ``s3://``
    the endpoint in ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) when none is given."""
    options = dict(_OPTIONS)
    if scheme(url) in ("s3", "s3a") and "endpoint_url" not in options \
            and "endpoint_url" not in options.get("client_kwargs", {}):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    return options


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a store URL; a missing package or an unknown scheme is one
    line naming what to install."""
    import fsspec

    try:
        return fsspec.url_to_fs(url, **storage_options(url))
    except ImportError:
        package = PACKAGES.get(scheme(url), f"the fsspec filesystem for {scheme(url)}://")
        extra = " (pip install 'softlabels[s3]')" if package == "s3fs" else f" (pip install {package})"
        raise ConfigError(f"{url!r} needs the package {package}, which is not installed{extra}") from None
    except ValueError as err:
        if "protocol" in str(err).lower():
            raise ConfigError(f"{url!r}: fsspec knows no filesystem {scheme(url)}://; use s3://, gs://, "
                              "memory://, file:// or a local path") from None
        raise ConfigError(f"{url!r}: bad storage options ({type(err).__name__}); check --storage-option") from None
    except TypeError:
        raise _unknown_option(url) from None


def _unknown_option(url: str) -> ConfigError:
    return ConfigError(f"{url!r}: a --storage-option is not an option of the {scheme(url)}:// filesystem; "
                       "check their names")


def check_root(fs: Any, url: str, root: str) -> None:
    """Refuse a bucket (or container) that does not exist or denies access, naming the URL only."""
    bucket = root.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False) if "/" in root else None
    except FileNotFoundError:
        raise StoreNotFound(f"{url!r}: the bucket {bucket!r} does not exist; create it or fix the URL") from None
    except PermissionError:
        raise StoreNotFound(f"{url!r}: access to the bucket {bucket!r} is denied; check the credentials "
                            "(AWS_PROFILE, AWS_ACCESS_KEY_ID, --storage-option)") from None
    except TypeError:  # a --storage-option the filesystem's client does not take, met on its first request
        raise _unknown_option(url) from None
    except Exception as err:  # noqa: BLE001 - the filesystem's own types (botocore's NoCredentialsError, ...)
        if "Credential" not in type(err).__name__ and "credential" not in str(err).lower():
            raise
        raise ConfigError(f"{url!r}: no credentials for {scheme(url)}:// were found ({type(err).__name__}); set "
                          "AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --storage-option "
                          "anon=true for a public bucket") from None

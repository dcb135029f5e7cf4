"""``--storage-option KEY=VALUE``: the one definition every command that opens a store shares."""

from __future__ import annotations

import click

HELP = ("A keyword argument of the filesystem of a store URL (s3://, gs://, ...), e.g. endpoint_url=http://host:9000, "
        "profile=NAME, anon=true, client_kwargs.region_name=eu-west-1; repeat it for several. Credentials otherwise "
        "come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...). Never logged or stored.")


def _apply(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    from softlabels.store.location import parse_storage_options, set_storage_options

    set_storage_options(parse_storage_options(value))


storage_option = click.option("--storage-option", multiple=True, metavar="KEY=VALUE", help=HELP,
                              callback=_apply, expose_value=False, is_eager=True)
"""Adds ``--storage-option`` to a command: its values go to the process's store URLs, not to the
command."""

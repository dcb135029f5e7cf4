"""The ``softlabels`` command line: one thin click module per command over the library API.

Every error, click's usage errors included, is one ``error:`` line and exit status 2
(docs/ERRORS.md); ``--help`` imports no torch, h5py or zarr.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from importlib import import_module

import click
from click.exceptions import NoArgsIsHelpError

from softlabels._runtime import signals as _signals
from softlabels._version import __version__
from softlabels.errors import SoftLabelsError


class _Group(click.Group):
    """A click group that turns library errors into one-line messages."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # No path or spec may hold a NUL byte; the OS would raise ValueError deep inside.
        bad = [a for a in args if "\x00" in a]
        if bad:
            raise _OneLine(f"argument {bad[0]!r} contains a NUL byte; remove it")
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            raise _usage_error(err) from None

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        _signals.end()  # from here on Ctrl-C is a KeyboardInterrupt, handled below
        # zarr writes through asyncio: after an error (a full disk, say) that we report in one line,
        # asyncio would log the same error again with a traceback when its future is collected
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        try:
            with _signals.stop_signals_as_ctrl_c():  # SIGTERM (a scheduler's stop) is Ctrl-C too
                result = super().invoke(ctx)
                sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's exit
                return result
        except BrokenPipeError as err:
            if not _stdout_closed():  # a pipe of our own (a worker's, a socket's) is a real error
                raise _OneLine(_describe_os_error(err)) from None
            _quiet_exit()
        except click.UsageError as err:  # an unknown option, a missing one, a value click cannot parse
            raise _usage_error(err) from None
        except SoftLabelsError as err:
            raise _OneLine(str(err)) from None
        except KeyboardInterrupt:
            raise _OneLine("interrupted; rerun the same command to resume") from None
        except OSError as err:
            # Disk full, permission denied, ... from the OS: say which file and why.
            raise _OneLine(_describe_os_error(err)) from None


_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
"""What str.splitlines() breaks at, written as escapes: a path or spec quoted in a message stays on its line."""


class _OneLine(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:  # one line, no traceback
        click.echo(f"error: {self.format_message().translate(_LINE_BREAKS)}", err=True)


def _usage_error(err: click.UsageError) -> click.ClickException:
    """Click's usage error as the one ``error:`` line every other error has (no usage block)."""
    if isinstance(err, NoArgsIsHelpError):  # a bare command: click prints its help instead
        return err
    text = " ".join(err.format_message().split()).replace(". (", " (").rstrip(".")
    where = err.ctx.command_path if err.ctx is not None else "softlabels"
    return _OneLine(f"{where}: {text[:1].lower()}{text[1:]}; see '{where} --help'")


def _stdout_closed() -> bool:
    """Whether nobody reads our stdout any more (``softlabels inspect S | head -1``)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or stdout is no file
        return False


def _quiet_exit() -> None:
    """End without a word, as command-line tools do when their reader leaves (Python's documented
    recipe: devnull on stdout, so that the interpreter's last flush has somewhere to go)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(1)


def _describe_os_error(err: OSError) -> str:
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    reason = " ".join((err.strerror or str(err)).split())  # some libraries' texts span lines
    return f"{reason}{where}; fix the path or free the resource and rerun the same command"


@click.group("softlabels", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="softlabels")
def main() -> None:
    """Offline knowledge distillation with precomputed teacher logits."""


for _name in ("generate", "train", "eval", "inspect", "report", "compress", "merge", "upgrade"):
    main.add_command(import_module(f"softlabels.cli.{_name}").command)

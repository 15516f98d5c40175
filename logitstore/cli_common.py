"""What both command lines share: user errors as one line, flag types, byte counts, progress bars."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import click
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .limits import Limit


# Set (to anything) to see the traceback behind a one-line error: a storage failure may also be a bug's OSError.
TRACEBACK_VARIABLE = "LOGITSTORE_TRACEBACK"


def one_line_errors(prog: str, user_errors: tuple[type[BaseException], ...],
                    exit_codes: dict[type[BaseException], int] | None = None,
                    on_interrupt: str | None = None) -> type[click.Group]:
    """A click Group class that prints user errors (and wrong flags) as one line on stderr and exits
    non-zero; anything else is a bug and keeps its traceback."""

    class OneLineErrors(click.Group):
        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except click.UsageError as exc:  # a wrong flag: one line, not click's usage block
                where = exc.ctx.command_path if exc.ctx is not None else prog
                click.echo(f"{prog}: error: {' '.join(exc.format_message().split())} (see `{where} --help`)",
                           err=True)
                ctx.exit(2)
            except user_errors as exc:
                if os.environ.get(TRACEBACK_VARIABLE):
                    raise
                click.echo(f"{prog}: error: {' '.join(str(exc).split())}", err=True)
                ctx.exit(next((c for t, c in (exit_codes or {}).items() if isinstance(exc, t)), 2))
            except KeyboardInterrupt:
                if on_interrupt is None:
                    raise
                click.echo(f"{prog}: {on_interrupt}", err=True)
                ctx.exit(130)
            except Exception as exc:
                line = storage_failure(exc)
                if line is None or os.environ.get(TRACEBACK_VARIABLE):
                    raise  # a bug (or a failure whose place the user asked to see): its traceback
                click.echo(f"{prog}: error: {line}", err=True)
                ctx.exit(1)

    return OneLineErrors


# Object-storage clients' own exceptions (credentials, endpoints, buckets): the environment, not a bug
_STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "fsspec", "aiohttp", "google.auth")


def storage_failure(exc: BaseException) -> str | None:
    """One line for a failure of the storage or the network under a command (no credentials, an unreachable
    endpoint, a missing bucket, a full or read-only disk), None for anything else."""
    remote = (type(exc).__module__ or "").split(".")[0] in {m.split(".")[0] for m in _STORAGE_MODULES}
    if not (remote or isinstance(exc, OSError)):
        return None
    what = " ".join(str(exc).split())[:240] or type(exc).__name__
    fix = ("the URL, the credentials (AWS_* variables, or --storage-option key=... and secret=...) and "
           "--storage-option endpoint_url" if remote or "bucket" in what.lower() else
           "the path, its permissions and the free space")
    return (f"storage failed ({type(exc).__name__}: {what}); check {fix}, then run the same command again "
            f"({TRACEBACK_VARIABLE}=1 shows where it failed)")


class Number(click.ParamType):
    """A flag whose value must satisfy a Limit (finite, in range)."""

    def __init__(self, limit: Limit):
        self.limit = limit
        self.name = "integer" if limit.kind is int else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        x = value
        if isinstance(value, str):
            try:
                x = int(value.strip()) if self.limit.kind is int else float(value)
            except ValueError:
                self.fail(f"{value!r} is not {'a whole number' if self.limit.kind is int else 'a number'}", param, ctx)
        if not self.limit.allows(x):
            self.fail(f"{value!r} is out of range: it must be {self.limit.describe()}", param, ctx)
        return x


def number(limit: Limit) -> Number:
    return Number(limit)


def parse_size(text: str | None, flag: str, hi: int = 4096) -> tuple[int, int] | None:
    """'H,W', 'HxW' or one side -> (H, W), each in 1..hi."""
    if text is None:
        return None
    try:
        vals = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1 or max(vals) > hi:
        raise click.BadParameter(f"{text!r}: expected H,W or a single side, each 1..{hi}", param_hint=flag)
    return vals[0], vals[1]


def storage_option_flag(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--storage-option KEY=VALUE (repeatable), the same on every command that opens a store."""
    return click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for URL stores (e.g. endpoint_url=http://127.0.0.1:9000); "
                             "repeatable.")(fn)


def json_flag(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--json: the command's result as JSON on stdout, the same facts as its table (no progress bar)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout (the same facts as the table; no progress bar).")(fn)


def emit_json(result: Any, **extra: Any) -> None:
    """A result (a dataclass or a dict) as indented JSON on stdout; `extra` adds derived keys."""
    doc = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    click.echo(json.dumps({**doc, **extra}, indent=2, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


class _Rate(TextColumn):
    """Items per second over the run so far, and a `loss` field when the task has one."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task: Any) -> Text:
        rate = task.fields.get("rate") or task.finished_speed or task.speed
        loss = task.fields.get("loss")
        text = f"{rate:,.0f} {self.unit}/s" if rate else f"- {self.unit}/s"
        return Text(text + (f"  loss {loss:.4f}" if loss is not None else ""))


def progress_bar(enabled: bool, unit: str = "img") -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    _Rate(unit), TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)

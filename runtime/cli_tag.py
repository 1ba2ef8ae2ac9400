"""``clap-tag BUNDLE FILES...``: tag audio files with a bundle's label banks.

Prints one JSON line per file with ``--json``::

    {"path": "a.wav", "model": "...", "tags": {"emotion": [{"label": "happy", "score": 0.41},
     ...]}, "timing_ms": 12.3}
    {"path": "bad.wav", "error": "bad.wav: cannot decode audio (...)"}

or a table otherwise. A file that cannot be read is reported with the reason and the
others are still tagged. Exit status: 0 all tagged, 1 some files failed, 2 the bundle or
the options are unusable. User errors never print a traceback.
"""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from clapedge.errors import ClapEdgeError
from clapedge.runtime.api import Runtime


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"clap-tag: error: {message}", err=True)
    sys.exit(code)


def _tag_file(rt: Runtime, path: str, banks: list[str], k: int) -> dict:
    t0 = time.perf_counter()
    if len(banks) == 1:
        tags = {banks[0]: rt.tag(path, banks[0], k)}
    else:
        tags = rt.tag_all(path, banks, k)
    return {"path": path, "model": rt.manifest.model.name,
            "tags": {b: [t.to_dict() for t in ts] for b, ts in tags.items()},
            "timing_ms": round(1e3 * (time.perf_counter() - t0), 3)}


def _table(results: list[dict], banks: list[str]) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("file")
    for bank in banks:
        table.add_column(bank)
    table.add_column("ms", justify="right")
    for r in results:
        if "error" in r:
            table.add_row(escape(r["path"]), f"[red]{escape(r['error'])}[/red]",
                          *[""] * len(banks))
            continue
        cells = [escape(", ".join(f"{t['label']} {t['score']:.3f}" for t in r["tags"][b]))
                 for b in banks]
        table.add_row(escape(r["path"]), *cells, f"{r['timing_ms']:.1f}")
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path())
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--bank", "banks", multiple=True, metavar="NAME",
              help="Bank or attribute head to report; repeat for several (default: the "
                   "bundle's default bank).")
@click.option("-k", "--top-k", "k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Labels per bank.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per file.")
@click.option("--providers", default="auto", show_default=True,
              help="'auto' or a comma-separated list, e.g. 'cuda,cpu'.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads (default: physical cores).")
def main(bundle: str, files: tuple[str, ...], banks: tuple[str, ...], k: int, as_json: bool,
         providers: str, threads: int | None) -> None:
    """Tag audio FILES with the label banks of BUNDLE."""
    requested = providers if providers == "auto" else [p.strip() for p in providers.split(",")]
    try:
        rt = Runtime(bundle, providers=requested, threads=threads)
        names = list(banks) or [rt.default_bank()]
        for name in names:
            rt.labels(name)  # unknown names fail here, before any file is read
    except ClapEdgeError as e:
        _fail(str(e))
    errors = Console(stderr=True)
    results, failed = [], 0
    progress = Progress(TextColumn("tagging"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=errors, transient=True,
                        disable=len(files) < 2 or not errors.is_terminal)
    with progress:
        task = progress.add_task("tag", total=len(files))
        for path in files:
            try:
                result = _tag_file(rt, path, names, k)
            except ClapEdgeError as e:
                result, failed = {"path": path, "error": str(e)}, failed + 1
            results.append(result)
            if as_json:
                click.echo(json.dumps(result, ensure_ascii=False))
            progress.advance(task)
    if not as_json:
        out = Console()
        if not out.is_terminal:  # piped: do not wrap paths at 80 columns
            out = Console(width=1000)
        out.print(_table(results, names))
    if failed:
        click.echo(f"clap-tag: {failed} of {len(files)} files failed", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

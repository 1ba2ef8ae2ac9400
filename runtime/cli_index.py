"""``clap-index``: build and maintain an embedding index of audio files.

    clap-index add INDEX --bundle BUNDLE PATHS... [--window-s 10 --hop-s 5] [--tag k=v]
    clap-index info INDEX [--verify] [--json]
    clap-index remove INDEX [IDS...] [--path-prefix P] [--path FILE]
    clap-index compact INDEX
    clap-index repair INDEX [--bundle BUNDLE | --drop]

``add`` creates the index on first use (recording the bundle), walks PATHS recursively,
skips files already indexed with the same content, cuts long files into windows, shows a
progress bar (files/s, ETA), reports unreadable files and goes on. Exit status: 0 done, 1 some
files failed (``add``) or damage found (``info --verify``), 2 the index, bundle or options are
unusable. User errors never print a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           TextColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from clapedge.errors import ClapEdgeError
from clapedge.runtime.catalog import CATALOG_FILE
from clapedge.runtime.index import Index, IndexDamagedWarning
from clapedge.runtime.indexer import Indexer, WindowPolicy, open_or_create, reembedder

PROG = "clap-index"


def fail(prog: str, message: str, code: int = 2) -> None:
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def parse_tags(items: tuple[str, ...], prog: str) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(prog, f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def open_runtime(bundle: str | None, index: Index, prog: str, providers: str = "auto",
                 threads: int | None = None):
    """The bundle given, or the one recorded in the index; checked against the index."""
    from clapedge.runtime.api import Runtime

    path = bundle or index.bundle_path
    if path is None:
        fail(prog, f"{index.root} records no bundle path: pass --bundle")
    if bundle is None and not Path(path).exists():
        fail(prog, f"the bundle recorded in {index.root} ({path}) no longer exists: pass "
                   f"--bundle")
    requested = providers if providers == "auto" else [p.strip() for p in providers.split(",")]
    rt = Runtime(path, providers=requested, threads=threads)
    index.check_bundle(rt)
    return rt


def report_damage(index: Index, console: Console) -> None:
    for d in index.damaged:
        console.print(f"[yellow]damaged segment {escape(d.segment)}: {escape(d.reason)} "
                      f"(excluded; run `clap-index repair {escape(str(index.root))}`)[/yellow]")


class RateColumn(ProgressColumn):
    """files/s of the task so far."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- files/s" if speed is None else f"{speed:.1f} files/s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build and maintain an embedding index of audio files."""
    warnings.simplefilter("ignore", IndexDamagedWarning)  # reported by report_damage


@main.command()
@click.argument("index", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--bundle", type=click.Path(), help="Bundle to embed with (required for a new "
              "index; default: the one recorded in the index).")
@click.option("--window-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Cut files longer than this into windows of this length (default: the "
                   "bundle's clip policy).")
@click.option("--hop-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Hop between windows (default: half the window).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Tag every added record; repeat for several.")
@click.option("--dtype", type=click.Choice(["int8", "fp16", "float32"]), default="int8",
              show_default=True, help="Vector storage of a new index.")
@click.option("--compact-above", type=click.IntRange(min=1), default=16, show_default=True,
              help="Compact afterwards when the index has more segments than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--providers", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
def add(index: str, paths: tuple[str, ...], bundle: str | None, window_s: float | None,
        hop_s: float | None, tags: tuple[str, ...], dtype: str, compact_above: int,
        as_json: bool, providers: str, threads: int | None) -> None:
    """Add the audio files under PATHS to INDEX (created if missing)."""
    errors = Console(stderr=True)
    tag_map = parse_tags(tags, PROG)
    root = Path(index)
    try:
        window = WindowPolicy(window_s, hop_s)
        if (root / CATALOG_FILE).exists():
            idx = Index.open(root)
            try:
                rt = open_runtime(bundle, idx, PROG, providers, threads)
            except BaseException:
                idx.close()
                raise
        else:
            if bundle is None:
                fail(PROG, f"{root} does not exist yet: pass --bundle to create it")
            from clapedge.runtime.api import Runtime
            requested = providers if providers == "auto" else providers.split(",")
            rt = Runtime(bundle, providers=requested, threads=threads)
            idx = open_or_create(root, rt, dtype=dtype)
    except ClapEdgeError as e:
        fail(PROG, str(e))
    with idx:
        report_damage(idx, errors)
        try:
            indexer = Indexer(idx, rt, window=window, tags=tag_map)
        except ClapEdgeError as e:
            fail(PROG, str(e))
        progress = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(),
                            RateColumn(), TimeRemainingColumn(), console=errors,
                            transient=True, disable=not errors.is_terminal)
        from clapedge.runtime.indexer import find_audio_files
        total = len(find_audio_files(paths))

        def on_file(path: str, status: str, error: str | None) -> None:
            if status == "failed":
                progress.console.print(f"[red]failed[/red] {escape(error or path)}")
            if status != "queued":
                progress.advance(task)

        with progress:
            task = progress.add_task("index", total=total)
            try:
                report = indexer.add(paths, on_file=on_file)
            except ClapEdgeError as e:
                fail(PROG, str(e))
        compacted = None
        if len(idx.info().segments) > compact_above and idx.writable:
            try:
                compacted = idx.compact()
            except ClapEdgeError as e:
                fail(PROG, f"files added, but {e}")
    summary = report.to_dict()
    summary["compacted"] = compacted is not None
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        rate = report.files_added / report.total_s if report.total_s else 0.0
        storage = report.store_s / report.total_s if report.total_s else 0.0
        errors.print(f"added {report.files_added} files ({report.records} records, "
                     f"{report.seconds_audio:.1f} s of audio), skipped "
                     f"{report.files_skipped} unchanged, {len(report.failed)} failed; "
                     f"{report.total_s:.1f} s ({rate:.1f} files/s, storage "
                     f"{100 * storage:.0f}% of the time)" +
                     ("; compacted" if compacted else ""))
    if report.failed:
        click.echo(f"{PROG}: {len(report.failed)} of "
                   f"{len(report.failed) + report.files_added + report.files_skipped} files "
                   f"failed", err=True)
        sys.exit(1)


@main.command()
@click.argument("index", type=click.Path())
@click.option("--verify", is_flag=True, help="Check every byte of every segment.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def info(index: str, verify: bool, as_json: bool) -> None:
    """What INDEX holds: bundle, counts, segments, damage."""
    try:
        with Index.open(index, readonly=True, verify="full" if verify else "auto") as idx:
            data = idx.info()
            problems = idx.verify() if verify else []
    except ClapEdgeError as e:
        fail(PROG, str(e))
    d = data.to_dict()
    if verify:
        d["verify"] = [{"segment": p.segment, "reason": p.reason} for p in problems]
    if as_json:
        click.echo(json.dumps(d, ensure_ascii=False))
    else:
        out = Console() if Console().is_terminal else Console(width=1000)
        table = Table(show_header=False, box=None)
        for key in ("path", "format_version", "model_name", "bundle_path", "bundle_sha256",
                    "dim", "dtype", "rerank_dtype", "records", "files", "tombstones",
                    "generation", "disk_bytes"):
            table.add_row(key, escape(str(d[key])))
        table.add_row("segments", escape(", ".join(f"{s['name']} ({s['count']})"
                                                   for s in d["segments"]) or "none"))
        out.print(table)
        for n, r in data.damaged:
            out.print(f"[yellow]damaged {escape(n)}: {escape(r)}[/yellow]")
        for p in problems:
            out.print(f"[red]verify: {escape(str(p))}[/red]")
        if verify and not problems:
            out.print("verify: every segment checks out")
    if problems or data.damaged:
        sys.exit(1)


@main.command()
@click.argument("index", type=click.Path())
@click.argument("ids", nargs=-1, type=int)
@click.option("--path-prefix", "prefixes", multiple=True, help="Remove records whose path "
              "starts with this (absolute) prefix; repeat for several.")
@click.option("--path", "paths", multiple=True, type=click.Path(),
              help="Remove the records of this file; repeat for several.")
def remove(index: str, ids: tuple[int, ...], prefixes: tuple[str, ...],
           paths: tuple[str, ...]) -> None:
    """Remove records by id, path prefix or file."""
    if not (ids or prefixes or paths):
        fail(PROG, "name what to remove: record IDS, --path-prefix or --path")
    import os
    try:
        with Index.open(index) as idx:
            n = idx.remove(list(ids), paths=[os.path.abspath(p) for p in paths])
            for prefix in prefixes:
                n += idx.remove(path_prefix=os.path.abspath(prefix) + (
                    os.sep if prefix.endswith(os.sep) else ""))
    except ClapEdgeError as e:
        fail(PROG, str(e))
    click.echo(f"removed {n} records")


@main.command()
@click.argument("index", type=click.Path())
def compact(index: str) -> None:
    """Merge segments and reclaim removed records' space."""
    try:
        with Index.open(index) as idx:
            stats = idx.compact()
    except ClapEdgeError as e:
        fail(PROG, str(e))
    click.echo(f"compacted {stats['segments']} segments into {stats['segments_after']}, "
               f"dropped {stats['tombstones']} removed records; {stats['records']} records")


@main.command()
@click.argument("index", type=click.Path())
@click.option("--bundle", type=click.Path(), help="Bundle to re-embed with (default: the one "
              "recorded in the index).")
@click.option("--drop", is_flag=True, help="Drop the damaged segments' records instead of "
              "re-embedding them.")
@click.option("--providers", default="auto", show_default=True)
def repair(index: str, bundle: str | None, drop: bool, providers: str) -> None:
    """Check every segment; rebuild damaged ones from their source files (or drop them)."""
    errors = Console(stderr=True)
    try:
        with Index.open(index) as idx:
            report_damage(idx, errors)
            reembed = None if drop else reembedder(open_runtime(bundle, idx, PROG, providers))
            report = idx.repair(reembed)
    except ClapEdgeError as e:
        fail(PROG, str(e))
    if not report.segments:
        click.echo("nothing to repair: every segment checks out")
        return
    for p in report.problems:
        click.echo(f"repaired {p}")
    click.echo(f"re-embedded {report.reembedded} records, dropped {report.dropped}")


if __name__ == "__main__":
    main()

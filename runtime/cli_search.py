"""``clap-search INDEX "a calm low-pitched female voice"``: search an index by description
(text tower) or, with ``--audio FILE``, by example ("more like this", audio tower).

Prints a table (rank, score, time span, path, tags) or, with ``--json``, one JSON line::

    {"query": "...", "index": "...", "model": "...", "k": 10,
     "results": [{"rank": 1, "id": 7, "path": "/data/a.wav", "start": 0.0, "end": 10.0,
                  "duration": 31.2, "score": 0.41, "tags": {}}],
     "timing_ms": {"embed": 3.1, "search": 1.2, "total": 4.3}}

The bundle defaults to the one recorded in the index; another bundle is refused (its
embeddings live in another space). Exit status: 0 done, 2 the index, bundle, query or
options are unusable.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clapedge.errors import ClapEdgeError
from clapedge.runtime.cli_index import fail, open_runtime, parse_tags, report_damage
from clapedge.runtime.index import Filter, Index, IndexDamagedWarning

PROG = "clap-search"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("index", type=click.Path())
@click.argument("query", required=False)
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--audio", type=click.Path(), help="Search by this audio file instead of text.")
@click.option("--bundle", type=click.Path(), help="Bundle (default: the one recorded in the "
              "index).")
@click.option("--path-prefix", help="Only records whose path starts with this.")
@click.option("--min-duration", type=click.FloatRange(min=0), default=None,
              help="Only files at least this long (seconds).")
@click.option("--max-duration", type=click.FloatRange(min=0), default=None,
              help="Only files at most this long (seconds).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Only records with this tag; repeat for several.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line.")
@click.option("--providers", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of the towers and the kernel (default: 1 for the text tower, all "
                   "cores for the audio tower and the kernel).")
def main(index: str, query: str | None, k: int, audio: str | None, bundle: str | None,
         path_prefix: str | None, min_duration: float | None, max_duration: float | None,
         tags: tuple[str, ...], as_json: bool, providers: str, threads: int | None) -> None:
    """Search INDEX by a description QUERY, or by example with --audio FILE."""
    if (query is None) == (audio is None):
        fail(PROG, "give either a QUERY text or --audio FILE")
    warnings.simplefilter("ignore", IndexDamagedWarning)
    t0 = time.perf_counter()
    try:
        flt = Filter(path_prefix=os.path.abspath(path_prefix) + (
                         os.sep if path_prefix.endswith(os.sep) else "")
                     if path_prefix else None,
                     min_duration=min_duration, max_duration=max_duration,
                     tags=parse_tags(tags, PROG) or None)
        with Index.open(index, readonly=True, threads=threads or 0) as idx:
            report_damage(idx, Console(stderr=True))
            # a text query is a few tokens: one thread is as fast, and leaves the cores to
            # the kernel (ONNX Runtime's pool threads keep spinning after a call)
            rt = open_runtime(bundle, idx, PROG, providers,
                              threads if threads or audio is not None else 1)
            t1 = time.perf_counter()
            emb = rt.embed_text([query]) if audio is None else rt.embed_audio(audio)
            t2 = time.perf_counter()
            hits = idx.search(emb, k, filter=flt)[0]
            t3 = time.perf_counter()
            model = rt.manifest.model.name
    except ClapEdgeError as e:
        fail(PROG, str(e))
    timing = {"embed": round(1e3 * (t2 - t1), 3), "search": round(1e3 * (t3 - t2), 3),
              "total": round(1e3 * (t3 - t0), 3)}
    results = [{"rank": i + 1, **h.to_dict()} for i, h in enumerate(hits)]
    if as_json:
        click.echo(json.dumps({"query": query if audio is None else None, "audio": audio,
                               "index": str(index), "model": model, "k": k,
                               "results": results, "timing_ms": timing}, ensure_ascii=False))
        return
    out = Console() if Console().is_terminal else Console(width=1000)
    table = Table(show_header=True, header_style="bold")
    for col, justify in (("#", "right"), ("score", "right"), ("span (s)", "right"),
                         ("path", "left"), ("tags", "left")):
        table.add_column(col, justify=justify)
    for r in results:
        table.add_row(str(r["rank"]), f"{r['score']:.3f}", f"{r['start']:.1f}-{r['end']:.1f}",
                      escape(r["path"]),
                      escape(", ".join(f"{a}={b}" for a, b in sorted(r["tags"].items()))))
    out.print(table)
    Console(stderr=True).print(f"{len(results)} results; embed {timing['embed']:.1f} ms, "
                               f"search {timing['search']:.1f} ms")


if __name__ == "__main__":
    main()

"""``clap-bench BUNDLE``: latency percentiles, RTF, load time and peak RSS of a bundle,
offline and streaming (see ``benchmark``). ``--json`` prints one JSON object."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from clapedge.errors import ClapEdgeError
from clapedge.runtime.benchmark import BenchReport, run_benchmark


def _table(r: BenchReport) -> Table:
    table = Table(title=f"{r.model} ({r.precision}, {' > '.join(r.providers)}, "
                        f"{r.threads} threads)", show_header=True, header_style="bold")
    for column in ("measure", "p50 ms", "p90 ms", "p99 ms", "RTF"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for name, lat in ((f"offline {r.clip_s:g} s clip", r.offline),
                      (f"stream hop {r.hop_s:g} s (window {r.window_s:g} s)", r.stream)):
        table.add_row(name, f"{lat.p50_ms:.2f}", f"{lat.p90_ms:.2f}", f"{lat.p99_ms:.2f}",
                      f"{lat.rtf:.4f}")
    table.add_row("load (manifest + audio session)", f"{r.load_ms:.1f}", "", "", "")
    table.add_row("first call", f"{r.first_call_ms:.1f}", "", "", "")
    table.add_row(f"batch of {r.batch_size}", f"{r.batch_clips_per_s:.1f} clips/s", "", "", "")
    table.add_row("peak RSS", f"{r.peak_rss_mb:.0f} MB", "", "", "")
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path())
@click.option("--clip", "clip_s", default=4.0, show_default=True,
              type=click.FloatRange(min=0.01), help="Offline clip length in seconds.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--batch", "batch_size", default=8, show_default=True,
              type=click.IntRange(min=1))
@click.option("--window", "window_s", default=2.0, show_default=True, type=float)
@click.option("--hop", "hop_s", default=0.5, show_default=True, type=float)
@click.option("--stream-seconds", "stream_s", default=20.0, show_default=True,
              type=click.FloatRange(min=0.1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--providers", default="auto", show_default=True,
              help="'auto' or a comma-separated list, e.g. 'cuda,cpu'.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
def main(bundle, clip_s, runs, warmup, batch_size, window_s, hop_s, stream_s, as_json,
         providers, threads) -> None:
    """Benchmark BUNDLE on this machine."""
    requested = providers if providers == "auto" else [p.strip() for p in providers.split(",")]
    try:
        report = run_benchmark(bundle, providers=requested, threads=threads, clip_s=clip_s,
                               runs=runs, warmup=warmup, batch_size=batch_size,
                               window_s=window_s, hop_s=hop_s, stream_s=stream_s)
    except ClapEdgeError as e:
        click.echo(f"clap-bench: error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        Console().print(_table(report))


if __name__ == "__main__":
    main()

"""Glue for ``make demo``: picks clips from a corpus and joins the CLIs' JSON output with the
corpus labels, so the demo shows predicted next to true attributes.

    python -m clapedge.train.demo pick CORPUS [-n 6]          test clips, varied labels
    clap-tag ... --json | python -m clapedge.train.demo tags CORPUS
    clap-search ... --json | python -m clapedge.train.demo search CORPUS
    python -m clapedge.train.demo concat CORPUS OUT.wav        low -> high arousal file
    clap-stream ... | python -m clapedge.train.demo stream
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from clapedge.train.corpus import load_manifest

SHOWN = ("sex", "arousal", "voice_quality", "pitch", "rate", "loudness")


def _rows_by_path(corpus: Path) -> dict[str, dict]:
    return {str(Path(r["path"]).resolve()): r for r in load_manifest(corpus)}


def _labels(row: dict | None, attributes=SHOWN) -> str:
    if row is None:
        return "?"
    return ", ".join(f"{a}={row['attributes'].get(a)}" for a in attributes
                     if row["attributes"].get(a) is not None)


@click.group()
def cli() -> None:
    """Demo helpers (see module docstring)."""


@cli.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.option("-n", default=6, show_default=True)
def pick(corpus: Path, n: int) -> None:
    """Prints N test clips covering different arousal/sex/voice-quality labels."""
    rows = load_manifest(corpus, split="test")
    seen, chosen = set(), []
    for row in rows:
        key = tuple(row["attributes"].get(a) for a in ("arousal", "sex", "voice_quality"))
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == n:
            break
    for row in chosen:
        click.echo(row["path"])


@cli.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
def tags(corpus: Path) -> None:
    """Reads clap-tag --json lines on stdin; prints predicted vs true labels."""
    rows = _rows_by_path(corpus)
    table = Table(title="clap-tag: predicted (top-1 per bank) vs true")
    table.add_column("clip")
    banks: list[str] = []
    results = [json.loads(line) for line in sys.stdin if line.strip()]
    for r in results:
        banks += [b for b in r.get("tags", {}) if b not in banks]
    for b in banks:
        table.add_column(b)
    hits = {b: 0 for b in banks}
    for r in results:
        row = rows.get(str(Path(r["path"]).resolve()))
        cells = []
        for b in banks:
            top = r.get("tags", {}).get(b, [{}])[0].get("label", "-")
            true = row["attributes"].get(b) if row else None
            ok = top == true
            hits[b] += ok
            cells.append(f"[{'green' if ok else 'red'}]{top}[/] (true {true})")
        table.add_row(Path(r["path"]).name, *cells)
    Console(width=160).print(table)
    click.echo("top-1 correct: " + ", ".join(f"{b} {hits[b]}/{len(results)}" for b in banks))


@cli.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
def search(corpus: Path) -> None:
    """Reads one clap-search --json line on stdin; prints the hits with their true labels."""
    rows = _rows_by_path(corpus)
    result = json.loads(sys.stdin.read())
    table = Table(title=f"clap-search \"{result['query']}\" ({result['timing_ms']['total']:.1f} ms)")
    for col in ("#", "score", "clip", "true attributes"):
        table.add_column(col)
    for hit in result["results"]:
        row = rows.get(str(Path(hit["path"]).resolve()))
        table.add_row(str(hit["rank"]), f"{hit['score']:.3f}", Path(hit["path"]).name, _labels(row))
    Console(width=160).print(table)


@cli.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def concat(corpus: Path, out: Path) -> None:
    """Writes low, mid then high arousal test clips (3 each) into one file; prints the truth."""
    import soundfile as sf

    rows = load_manifest(corpus, split="test")
    pieces, t = [], 0.0
    for level in ("low", "mid", "high"):
        for row in [r for r in rows if r["attributes"].get("arousal") == level][:3]:
            audio, rate = sf.read(row["path"], dtype="float32")
            pieces.append(audio)
            click.echo(f"{t:6.2f}-{t + len(audio) / rate:6.2f} s  true arousal={level}")
            t += len(audio) / rate
    sf.write(out, np.concatenate(pieces), rate, subtype="PCM_16")


@cli.command()
def stream() -> None:
    """Reads clap-stream JSON lines on stdin; prints one line per window with its top tag."""
    for line in sys.stdin:
        if not line.strip():
            continue
        event = json.loads(line)
        tags = "; ".join(f"{b}: {ts[0]['label']} ({ts[0]['score']:.2f})"
                         for b, ts in event["tags"].items() if ts)
        click.echo(f"{event['start_s']:6.2f}-{event['end_s']:6.2f} s  {tags}  "
                   f"[{event['decode_ms']:.0f} ms]")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

"""``clap-export``: PyTorch CLAP model directory -> (INT8) ONNX bundle."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from clapedge.errors import ClapEdgeError


def _lengths(ctx, param, value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated seconds, e.g. 1,2,5,10") from None
    if not out or min(out) <= 0:
        raise click.BadParameter("lengths must be positive")
    return out


def _labels(ctx, param, values) -> tuple[tuple[str, Path], ...]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise click.BadParameter(f"{v!r}: use NAME=prompts.json")
        out.append((name, Path(path)))
    return tuple(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (refused if it exists, unless --force).")
@click.option("--int8", "precision", flag_value="int8", help="INT8: dynamic INT8 GEMMs with GPTQ-rounded weights in the audio tower (static QDQ for --target tensorrt), SmoothQuant + dynamic INT8 text tower; the accuracy search keeps what costs more than --max-drop in float.")
@click.option("--fp16", "precision", flag_value="fp16", help="fp16 weights and compute, fp32 I/O.")
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="fp32 (default).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration audio: a directory or a JSON-lines manifest.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help="Held-out labelled manifest for the accuracy check (default: the calibration manifest's test split).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile", show_default=True)
@click.option("--calib-lengths", default="1,2,5,10", callback=_lengths, show_default=True, help="Deployment clip lengths in seconds to calibrate at.")
@click.option("--calib-clips", default=6, show_default=True, help="Calibration clips per length.")
@click.option("--max-drop", type=float, default=0.005, show_default=True, help="Largest task-metric drop INT8 may cost; more sensitive nodes stay float until it fits.")
@click.option("--target", type=click.Choice(["cpu", "tensorrt"]), default="cpu", show_default=True, help="tensorrt: symmetric int8 QDQ (zero point 0) for TensorRT explicit quantization.")
@click.option("--engine", is_flag=True, help="Also build a TensorRT engine (needs TensorRT and a GPU).")
@click.option("--banks", type=click.Choice(["corpus", "paraspeechclap", "none"]), default="corpus", show_default=True, help="Built-in label banks.")
@click.option("--labels", multiple=True, callback=_labels, help="Extra label bank NAME=prompts.json ({label: prompt(s)} or {template, labels}).")
@click.option("--tagger-bank", default=None, help="Bank baked into tagger.onnx (default: the first).")
@click.option("--tagger-k", default=3, show_default=True)
@click.option("--no-tagger", is_flag=True, help="Leave out tagger.onnx (the runtime then tags with the audio tower and the top-k kernel); the bundle keeps one copy of the audio weights fewer.")
@click.option("--no-stream-split", is_flag=True, help="Leave out the streaming split (audio_frontend.onnx + audio_encoder.onnx); streams then encode whole windows.")
@click.option("--no-native-frontend", is_flag=True, help="INT8: leave out audio_frontend.native.npz (the runtime then runs audio.onnx everywhere).")
@click.option("--no-gemm-front-end", is_flag=True, help="Keep the conv front end as Conv ops.")
@click.option("--front-end", type=click.Choice(["rowwise", "static", "float"]), default=None,
              help="INT8 of the conv front end GEMMs: per-frame dynamic (default on cpu), static QDQ (default for tensorrt) or float.")
@click.option("--gemm", type=click.Choice(["rowwise", "dynamic", "static"]), default=None,
              help="INT8 of the other weight GEMMs: per-tensor dynamic (default on cpu), per-row dynamic, or static QDQ (default and only choice for tensorrt).")
@click.option("--rounding", type=click.Choice(["gptq", "nearest"]), default="gptq", show_default=True,
              help="Weight rounding of the dynamic GEMMs: error-compensated on calibration activations (GPTQ) or to nearest.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@click.option("-v", "--verbose", is_flag=True)
def main(model_dir, output, precision, calib, eval_data, calib_method, calib_lengths, calib_clips,
         max_drop, target, engine, banks, labels, tagger_bank, tagger_k, no_tagger,
         no_stream_split, no_native_frontend, no_gemm_front_end,
         front_end, gemm, rounding, seed, force, as_json, verbose):
    """Export MODEL_DIR (a clapedge model directory, see clap-convert) to a bundle."""
    from rich.console import Console

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet = contextlib.nullcontext() if verbose else _quiet()
    try:
        from clapedge.export.pipeline import ExportOptions, export_bundle

        options = ExportOptions(
            precision=precision, calib=calib, eval_data=eval_data, calib_method=calib_method,
            calib_lengths=calib_lengths, calib_clips=calib_clips, max_drop=max_drop,
            target=target, banks=banks, bank_files=labels, tagger_bank=tagger_bank,
            tagger_k=tagger_k, tagger=not no_tagger, stream_split=not no_stream_split,
            native_frontend=not no_native_frontend, gemm_front_end=not no_gemm_front_end, force=force, seed=seed,
            front_end=front_end or ("static" if target == "tensorrt" else "rowwise"),
            gemm=gemm, rounding=rounding)
        if engine:
            from clapedge.export.tensorrt import require_tensorrt

            require_tensorrt()
        with quiet, console.status("exporting") as status:
            def progress(message: str) -> None:
                status.update(message)
                console.log(message)

            report = export_bundle(model_dir, output, options, progress=progress)
        if engine:
            from clapedge.export.tensorrt import build_engines

            build_engines(output)
    except ClapEdgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        _summary(console, report)


@contextlib.contextmanager
def _quiet():
    """The exporters we drive (torch.onnx, onnxscript, onnxruntime's quantizer and
    transformer optimizer) print and log a lot that is expected on these graphs; -v shows it."""
    import io
    import warnings

    loggers = [logging.getLogger(n) for n in ("", "torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _summary(console, report) -> None:
    from rich.table import Table

    table = Table(title=f"clap-export -> {report.bundle}")
    table.add_column("item")
    table.add_column("value")
    for tower, p in report.parity.items():
        table.add_row(f"parity {tower} (fp32 vs PyTorch)",
                      f"cosine >= {p['min_cosine']:.6f}, max abs err {p['max_abs_error']:.2e}")
    q = report.quantization
    if q:
        a = q["audio"]
        forms = [f"{a[key]} {label}" for key, label in (
            ("rowwise_dynamic_nodes", "GEMMs per-row dynamic"),
            ("per_tensor_dynamic_nodes", "GEMMs per-tensor dynamic"),
            ("static_qdq_nodes", "nodes static QDQ")) if a.get(key)]
        table.add_row("audio INT8", f"{', '.join(forms) or 'nothing'} ({a['weights']}); float: "
                      + ", ".join(f"{v} {k}" for k, v in a["kept_float"].items()))
    for key, value in report.quality.items():
        table.add_row(key, json.dumps(value) if not isinstance(value, float) else f"{value:.4f}")
    for key, value in report.sizes.items():
        table.add_row(key, f"{value}")
    for key, value in report.latency_ms.items():
        table.add_row(f"latency {key}", f"{value} ms")
    console.print(table)

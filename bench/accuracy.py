"""Accuracy of the default model, fp32 vs INT8, per task: ``clap-eval`` of the fp32 and the
INT8 bundle of ``models/default`` (and of the PyTorch model itself) on the held-out test
split of the default corpus.

    python -m clapedge.bench.accuracy [--corpus data/corpus-default] [--limit N] [--no-pytorch]

The bundles come from ``clapedge.bench.default_bundles`` (``clap-export`` as a user runs it;
the INT8 accuracy budget is checked on the val split, so the test split reported here played
no part in choosing what stays float). Writes the ``accuracy`` section of docs/benchmarks.md
and docs/plots/accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from clapedge.bench.default_bundles import BIN, CORPUS, MODEL, ROOT, default_bundles

PLOT = ROOT / "docs" / "plots" / "accuracy.png"


def clap_eval(target: Path | str, corpus: Path, split: str, limit: int | None) -> tuple[dict, str, float]:
    """Runs clap-eval --json; returns (report, the command as run from ROOT, seconds)."""
    rel = str(Path(target).resolve().relative_to(ROOT)) if Path(target).is_absolute() else str(target)
    cmd = ["clap-eval", rel, str(corpus), "--split", split, "--json"]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    text = done.stdout[done.stdout.index("{"):]
    return json.loads(text), shlex.join(cmd), time.perf_counter() - t0


RETRIEVAL_ORDER = ("P@1", "P@10", "exact R@1", "exact R@5", "exact R@10", "exact median_rank")


def lower_is_better(metric: str) -> bool:
    return metric.endswith("median_rank")


def metric_rows(reports: dict[str, dict]) -> list[tuple[str, dict[str, float]]]:
    """[(metric name, {column: value})] in a stable order: UAR per attribute, Kendall tau per
    ordinal attribute (both in the corpus's attribute order), then retrieval."""
    from clapedge.train.attributes import ATTRIBUTES

    first = next(iter(reports.values()))
    order = {a: i for i, a in enumerate(ATTRIBUTES)}
    by_attribute = lambda names: sorted(names, key=lambda a: (order.get(a, len(order)), a))  # noqa: E731
    rows = []
    for attribute in by_attribute(first["classification"]):
        rows.append((f"{attribute} UAR", {c: r["classification"][attribute]["uar"]
                                          for c, r in reports.items()}))
    for attribute in by_attribute(first["ordinal"]):
        rows.append((f"{attribute} Kendall tau", {c: r["ordinal"][attribute]
                                                  for c, r in reports.items()}))
    for task in sorted(first["retrieval"], reverse=True):  # text_to_audio first
        keys = sorted(first["retrieval"][task], key=lambda k: (
            RETRIEVAL_ORDER.index(k) if k in RETRIEVAL_ORDER else len(RETRIEVAL_ORDER), k))
        for key in keys:
            rows.append((f"{task.replace('_to_', '->')} {key}",
                         {c: r["retrieval"][task][key] for c, r in reports.items()}))
    return rows


def kept_float(bundle: Path) -> str:
    report = json.loads((bundle / "export_report.json").read_text())
    q = report.get("quantization", {})
    search = q.get("accuracy_search", {})
    kept = search.get("kept_float", [])
    attempts = search.get("attempts", [])
    text_float = any(a.get("text_float") for a in attempts[-1:])
    audio = q.get("audio", {})
    parts = [f"{audio.get('rowwise_dynamic_nodes', 0)} audio GEMMs per-row dynamic INT8, "
             f"{audio.get('per_tensor_dynamic_nodes', 0)} per-tensor dynamic, "
             f"{audio.get('static_qdq_nodes', audio.get('quantized_nodes', 0))} static QDQ "
             f"(weights {audio.get('weights', 'int8 per-channel')})"]
    parts.append(f"{len(kept)} kept float by the accuracy search ({len(attempts)} attempt"
                 f"{'s' if len(attempts) != 1 else ''})" if attempts else "no accuracy search")
    parts.append("text tower float" if text_float else "text tower dynamic INT8")
    budget = report.get("quality", {}).get("max_drop_budget")
    if budget is not None:
        parts.append(f"budget --max-drop {budget:g} on the val split")
    return "; ".join(parts)


def plot(rows: list[tuple[str, dict[str, float]]], path: Path, title: str,
         budget: float | None) -> None:
    """Left: fp32 and INT8 per metric; right: INT8 - fp32 with the export's budget shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [(n, v) for n, v in rows if not lower_is_better(n)]
    names = [n for n, _ in shown][::-1]
    y = np.arange(len(names))
    fp32 = np.array([v["ONNX fp32"] for _, v in shown][::-1])
    int8 = np.array([v["ONNX INT8"] for _, v in shown][::-1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.36 * len(names) + 1.8),
                                      sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    left.barh(y + 0.2, fp32, 0.4, label="fp32", color="#1f77b4")
    left.barh(y - 0.2, int8, 0.4, label="INT8", color="#d62728")
    left.set_yticks(y, names, fontsize=9)
    left.set_xlim(0, 1)
    left.set_xlabel("value on the test split (higher is better)")
    left.grid(True, axis="x", alpha=0.3)
    left.legend(loc="lower right", fontsize=9)
    diff = int8 - fp32
    right.barh(y, diff, 0.6, color=np.where(diff < 0, "#d62728", "#2ca02c"))
    if budget is not None:
        right.axvspan(-budget, budget, color="#bbbbbb", alpha=0.35, zorder=0,
                      label=f"export budget ±{budget:g} (checked on val)")
        right.legend(loc="lower right", fontsize=8)
    right.axvline(0, color="black", lw=0.8)
    lim = max(0.03, float(np.abs(diff).max()) * 1.25)
    right.set_xlim(-lim, lim)
    right.set_xlabel("INT8 - fp32")
    right.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from clapedge.bench.report import save_figure

    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from clapedge.bench.report import machine_line, write_section

    ap = argparse.ArgumentParser(prog="python -m clapedge.bench.accuracy",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N clips only (quick runs)")
    ap.add_argument("--no-pytorch", action="store_true", help="skip clap-eval of the PyTorch model")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    machine = machine_line()
    bundles = default_bundles(corpus=args.corpus)
    targets = {"ONNX fp32": bundles.fp32, "ONNX INT8": bundles.int8}
    if not args.no_pytorch:
        targets = {"PyTorch fp32": MODEL, **targets}
    reports, commands, seconds = {}, {}, {}
    for name, target in targets.items():
        print(f"clap-eval {name} ...", flush=True)
        reports[name], commands[name], seconds[name] = clap_eval(target, args.corpus,
                                                                 args.split, args.limit)
    columns = list(reports)
    rows = metric_rows(reports)
    clips = reports["ONNX INT8"]["clips"]

    from importlib.metadata import version

    import numpy
    import onnxruntime
    lines = [
        "## Accuracy: fp32 vs INT8 on the default model",
        "",
        f"Command: `python -m clapedge.bench.accuracy{' ' + shlex.join(argv) if argv else ''}`, "
        "which runs:",
        "",
        "```sh",
        *[bundles.commands[p] for p in ("fp32", "int8")],
        *commands.values(),
        "```",
        "",
        f"Machine: {machine}. Versions: clapedge {version('clapedge')}, onnxruntime "
        f"{onnxruntime.__version__}, numpy "
        f"{numpy.__version__}, Python {sys.version.split()[0]}.",
        "",
        f"Bundles exported at {bundles.exported_at['int8']} (INT8) and "
        f"{bundles.exported_at['fp32']} (fp32). "
        f"Model `models/default` (weights sha256 {bundles.key}..., docs/default-model.md); "
        f"corpus `{args.corpus}`, split `{args.split}`: {clips} clips, sentences never spoken "
        "in training and two held-out voices. INT8 bundle: "
        f"{kept_float(bundles.int8)}. UAR = unweighted average recall of zero-shot "
        "classification against the label prompts; Kendall tau of the expected level "
        "(ordinal attributes); text->audio P@k = share of the top k whose attributes match a "
        "two-attribute query; exact R@k = the clip of the caption is in the top k. "
        f"clap-eval time: " + ", ".join(f"{c} {seconds[c]:.0f} s" for c in columns) + ".",
        "",
        "| metric | " + " | ".join(columns) + " | INT8 - fp32 |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    worst = ("", 0.0)
    for name, values in rows:
        change = values["ONNX INT8"] - values["ONNX fp32"]
        loss = change if not lower_is_better(name) else -change
        if loss < worst[1] and not lower_is_better(name):
            worst = (name, loss)
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in columns)
                     + f" | {change:+.3f} |")
    lines += ["", "(median_rank: lower is better.) "
              + (f"Largest INT8 loss on a higher-is-better metric: {worst[0]} ({worst[1]:+.3f})."
                 if worst[0] else "INT8 lost nothing on any higher-is-better metric.")]
    if not args.no_pytorch:
        diff = max(abs(v["PyTorch fp32"] - v["ONNX fp32"]) for _, v in rows)
        lines.append(f"ONNX fp32 vs PyTorch fp32: largest difference {diff:.3f} on any metric.")
    lines += ["", "![accuracy fp32 vs INT8](plots/accuracy.png)"]
    text = "\n".join(lines) + "\n"
    print(text)
    budget = json.loads((bundles.int8 / "export_report.json").read_text()).get(
        "quality", {}).get("max_drop_budget")
    raw = ROOT / "build" / "bench" / "accuracy-reports.json"
    raw.write_text(json.dumps({"reports": reports, "commands": commands}, indent=1))
    if not args.no_write:
        write_section("accuracy", text)
        plot(rows, PLOT, f"models/default, ONNX bundles, {args.corpus.name} {args.split} "
             f"split ({clips} clips): fp32 vs INT8", budget)
        print(f"wrote docs/benchmarks.md (accuracy) and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundle size and load time of the default model's fp32 and INT8 bundles.

    python -m clapedge.bench.bundle [--loads 7]

Sizes: every file of each bundle on disk. Load: each measurement is a fresh Python process
(median of ``--loads``), so imports and session creation are paid every time; the files sit
in the OS page cache (a first load after boot also reads them from storage). Measured in the
child process:

- import: ``import clapedge.runtime``;
- load: ``Bundle.load(path)`` (manifest, checksums, the audio tower's session: what
  ``Runtime(path)`` does before the first call);
- all towers: load, then the text and tagger sessions too (``Bundle.tower``);
- all towers, warm cache: the same with ``cache_dir`` holding the checksum record and the
  optimised graphs from an earlier load;
- first tag: ``Runtime(path).tag(2 s of audio)`` from nothing but the import;
- peak RSS of the process after all towers are loaded.

Writes the ``bundle`` section of docs/benchmarks.md and docs/plots/bundle.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from clapedge.bench.default_bundles import ROOT, default_bundles

PLOT = ROOT / "docs" / "plots" / "bundle.png"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
import clapedge.runtime as r
t_import = time.perf_counter() - t0
path, mode, cache = sys.argv[1], sys.argv[2], sys.argv[3] or None
out = {"import": t_import}
if mode == "tag":
    t = time.perf_counter()
    rt = r.Runtime(path, cache_dir=cache)
    rt.tag((0.01 * np.sin(np.arange(32000) / 7.0)).astype(np.float32), sample_rate=16000)
    out["first_tag"] = time.perf_counter() - t
else:
    t = time.perf_counter()
    b = r.Bundle.load(path, cache_dir=cache)
    out["load"] = time.perf_counter() - t
    for role in ("text", "tagger"):
        if b.has_tower(role):
            b.tower(role)
    out["all_towers"] = time.perf_counter() - t
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def file_sizes(bundle: Path) -> dict[str, int]:
    """Bytes per part: each ONNX file, the tokenizer, the banks, and the rest (manifest,
    report) as "other"."""
    parts: dict[str, int] = {}
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = f.relative_to(bundle)
        if len(rel.parts) > 1:
            key = rel.parts[0]
        elif rel.suffix in (".onnx", ".plan") or rel.name == "tokenizer.json":
            key = rel.name
        else:
            key = "other"
        parts[key] = parts.get(key, 0) + f.stat().st_size
    order = ["audio.onnx", "tagger.onnx", "audio_frontend.onnx", "audio_encoder.onnx",
             "text.onnx", "tokenizer.json", "banks", "other"]
    return dict(sorted(parts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                      else len(order) - 1, kv[0])))


def child(path: Path, mode: str, cache: str = "") -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, cache], cwd=ROOT,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"loading {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(path: Path, loads: int) -> dict[str, float]:
    child(path, "load")  # page cache warm-up, not counted
    cold = [child(path, "load") for _ in range(loads)]
    with tempfile.TemporaryDirectory(prefix="clapedge-bench-cache-") as cache:
        child(path, "load", cache)  # fills the cache
        warm = [child(path, "load", cache) for _ in range(loads)]
    tags = [child(path, "tag") for _ in range(loads)]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"import": med(cold, "import"), "load": med(cold, "load"),
            "all_towers": med(cold, "all_towers"), "all_towers_cached": med(warm, "all_towers"),
            "first_tag": med(tags, "first_tag"), "rss_mb": med(cold, "rss_mb")}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def text_note(int8: Path) -> str:
    """Why the INT8 bundle's text tower has the size it has."""
    import onnx

    from clapedge.runtime.manifest import read_manifest

    spec = read_manifest(int8).towers.text
    if spec is None:
        return ""
    if spec.precision != "int8":
        return (f"The INT8 bundle's text tower is {spec.precision}: the export's accuracy "
                "search kept it float (its INT8 form cost more than the `--max-drop` budget "
                "on the val split; the export report lists the attempts).")
    model = onnx.load(str(int8 / spec.file), load_external_data=False)
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    total = (int8 / spec.file).stat().st_size
    return (f"In the INT8 `{spec.file}`, the largest tensor is `{big.name}` {list(big.dims)} "
            f"({onnx.helper.tensor_dtype_to_np_dtype(big.data_type)}, "
            f"{len(big.raw_data) / 1e6:.1f} MB, {100 * len(big.raw_data) / total:.0f} % of the "
            "file).")


def copies_note(sizes: dict[str, int]) -> str:
    audio = sizes.get("audio.onnx", 0)
    copies = [name for name in ("tagger.onnx", "audio_encoder.onnx")
              if sizes.get(name, 0) > 0.8 * audio]
    if not audio or not copies:
        return ""
    why = {"tagger.onnx": "the fused tagger graph",
           "audio_encoder.onnx": "the streaming split's encoder"}
    return (f" The audio tower's weights are stored {1 + len(copies)} times: `audio.onnx` and "
            + " and ".join(f"`{c}` ({why[c]})" for c in copies) + " each hold a copy.")


def plot(sizes: dict[str, dict[str, int]], times: dict[str, dict[str, float]],
         path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(sizes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    bottom = np.zeros(len(names))
    # Light colours for the files, and the accuracy plot's fp32 blue / INT8 red for bundles.
    colours = {"audio.onnx": "#17becf", "tagger.onnx": "#98df8a",
               "audio_frontend.onnx": "#dbdb8d", "audio_encoder.onnx": "#9edae5",
               "text.onnx": "#ffbb78", "tokenizer.json": "#c5b0d5", "banks": "#8c564b",
               "other": "#7f7f7f"}
    for extra in dict.fromkeys(k for s in sizes.values() for k in s):
        colours.setdefault(extra, "#c7c7c7")
    bundle_colours = {"fp32": "#1f77b4", "INT8": "#d62728"}
    for part, colour in colours.items():
        values = np.array([sizes[n].get(part, 0) / 1e6 for n in names])
        if values.sum() == 0:
            continue
        left.bar(names, values, bottom=bottom, label=part, color=colour, width=0.55)
        bottom += values
    for i, total in enumerate(bottom):
        left.text(i, total, f"{total:.0f} MB", ha="center", va="bottom", fontsize=9)
    left.set_ylabel("size on disk (MB)")
    left.set_title("bundle size by file", fontsize=10)
    left.set_ylim(0, bottom.max() * 1.75)  # room above the bars for the legend
    left.legend(fontsize=8, loc="upper center", ncol=2)
    keys = [("load", "Bundle.load\n(audio tower)"), ("all_towers", "all towers"),
            ("all_towers_cached", "all towers,\nwarm cache_dir"), ("first_tag", "first tag")]
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [1e3 * times[name][k] for k, _ in keys]
        bars = right.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name,
                         color=bundle_colours.get(name))
        right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(x, [label for _, label in keys], fontsize=9)
    right.set_ylabel("ms (median of fresh processes)")
    right.set_title("load time, after `import clapedge.runtime`", fontsize=10)
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    from clapedge.bench.report import save_figure

    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    import onnxruntime

    from clapedge.bench.report import machine_line, write_section

    ap = argparse.ArgumentParser(prog="python -m clapedge.bench.bundle",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=7, help="fresh processes per measurement")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    machine = machine_line()
    bundles = default_bundles()
    paths = {"fp32": bundles.fp32, "INT8": bundles.int8}
    sizes = {name: file_sizes(p) for name, p in paths.items()}
    times = {}
    for name, p in paths.items():
        print(f"loading the {name} bundle {args.loads} x 4 times in fresh processes ...", flush=True)
        times[name] = measure(p, args.loads)
    total = {n: sum(s.values()) for n, s in sizes.items()}
    lines = [
        "## Bundle size and load time",
        "",
        f"Command: `python -m clapedge.bench.bundle{' ' + shlex.join(argv) if argv else ''}`; "
        "the bundles: `" + "` and `".join(bundles.commands[p] for p in ("fp32", "int8")) + "`.",
        "",
        f"Machine: {machine}. Versions: clapedge {version('clapedge')}, onnxruntime "
        f"{onnxruntime.__version__}, Python {sys.version.split()[0]}. Bundles exported at "
        f"{bundles.exported_at['int8']} (INT8) and {bundles.exported_at['fp32']} (fp32).",
        "",
        "| file (MB) | " + " | ".join(paths) + " |",
        "|---|" + "---:|" * len(paths),
    ]
    parts = list(dict.fromkeys(k for s in sizes.values() for k in s))
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(mb(sizes[n].get(part, 0)) for n in paths) + " |")
    lines.append("| **total** | " + " | ".join(f"**{mb(total[n])}**" for n in paths) + " |")
    lines += [
        "",
        f"The INT8 bundle is {total['fp32'] / total['INT8']:.1f}x smaller in all; the largest "
        "file: " + ", ".join(f"{n} {max(s, key=s.get)} ({100 * max(s.values()) / total[n]:.0f} %)"
                             for n, s in sizes.items())
        + " (the default model's text tower is MiniLM, 22.7M parameters; its audio tower has "
        f"4.9M, see docs/models.md). {text_note(bundles.int8)}{copies_note(sizes['INT8'])}",
        "",
        f"Load times: median of {args.loads} fresh processes each (files in the page cache; "
        "see the bench's docstring for what each column includes). `cache_dir` keeps the "
        "record of verified checksums and ONNX Runtime's optimised graphs.",
        "",
        "| bundle | import | Bundle.load (audio tower) | all towers | all towers, warm cache_dir "
        "| first tag (load + 2 s clip) | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, t in times.items():
        lines.append(f"| {n} | {1e3 * t['import']:.0f} ms | {1e3 * t['load']:.0f} ms | "
                     f"{1e3 * t['all_towers']:.0f} ms | {1e3 * t['all_towers_cached']:.0f} ms | "
                     f"{1e3 * t['first_tag']:.0f} ms | {t['rss_mb']:.0f} MB |")
    lines += ["", "![bundle size and load time](plots/bundle.png)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("bundle", text)
        plot(sizes, times, PLOT, f"models/default bundles; {machine.split(';')[0]}")
        print(f"wrote docs/benchmarks.md (bundle) and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

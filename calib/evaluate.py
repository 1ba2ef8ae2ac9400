"""``clap-eval``: the task metrics of a model on a labelled corpus split.

MODEL is a PyTorch model directory (``config.json`` + ``model.safetensors``) or an exported
bundle (``manifest.json``); both are judged by the same code, so fp32 and INT8 numbers are
comparable. Zero-shot attribute classification uses prompt ensembles from
``clapedge.train.attributes`` (averaged, re-normalised embeddings per label); a bundle whose
label bank was encoded from exactly those prompts is scored against that stored bank, as its
``tag()`` classifies (see ``stored_bank``). Retrieval is text->audio (the ESSR direction) and
audio->text, through the model's own text tower.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from clapedge.calib import metrics
from clapedge.calib.readers import CalibItem, decode_items, read_source
from clapedge.errors import ClapEdgeError


class Embedder(Protocol):
    sample_rate: int

    def embed_audio(self, signals: list[np.ndarray]) -> np.ndarray: ...

    def embed_text(self, texts: list[str]) -> np.ndarray: ...


def stored_bank(embedder: Embedder, name: str, prompts: dict[str, list[str]]) -> np.ndarray | None:
    """The label bank a bundle stores for ``name`` when it was encoded from exactly these
    prompts (the exporter encodes banks with the fp32 PyTorch text tower, and ``tag()``
    classifies against them), else None. Zero-shot classification of a bundle then scores
    what its users get: an INT8 text tower changes free-text queries, not the stored banks."""
    lookup = getattr(embedder, "stored_bank", None)
    return None if lookup is None else lookup(name, prompts)


@dataclass
class EvalReport:
    model: str
    split: str
    clips: int
    classification: dict[str, dict[str, float]] = field(default_factory=dict)
    ordinal: dict[str, float] = field(default_factory=dict)
    retrieval: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> dict[str, float]:
        """One number per task: the values ``--max-drop`` budgets compare."""
        out = {f"uar/{a}": m["uar"] for a, m in self.classification.items()}
        out.update({f"tau/{a}": t for a, t in self.ordinal.items()})
        if "P@10" in self.retrieval.get("text_to_audio", {}):
            out["t2a/P@10"] = self.retrieval["text_to_audio"]["P@10"]
        return out

    def to_markdown(self) -> str:
        lines = [f"Model `{self.model}`, split `{self.split}`, {self.clips} clips.", "",
                 "| attribute | accuracy | UAR | macro-F1 | Kendall tau |", "|---|---|---|---|---|"]
        for a, m in self.classification.items():
            tau = f"{self.ordinal[a]:.3f}" if a in self.ordinal else ""
            lines.append(f"| {a} | {m['accuracy']:.3f} | {m['uar']:.3f} | {m['macro_f1']:.3f} | {tau} |")
        lines += ["", "| retrieval | " + " | ".join(_retrieval_keys(self.retrieval)) + " |",
                  "|---|" + "---|" * len(_retrieval_keys(self.retrieval))]
        for name, r in self.retrieval.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r[k]:.3f}" if k in r else "" for k in _retrieval_keys(self.retrieval)) + " |")
        return "\n".join(lines) + "\n"


def _retrieval_keys(retrieval: dict) -> list[str]:
    keys: list[str] = []
    for r in retrieval.values():
        keys += [k for k in r if k not in keys]
    return keys


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def label_bank(embedder: Embedder, prompts: dict[str, list[str]]) -> np.ndarray:
    """[n_labels, D]: each label's prompt embeddings averaged and re-normalised."""
    rows = [normalize(embedder.embed_text(p).mean(axis=0)) for p in prompts.values()]
    return np.stack(rows).astype(np.float32)


def attribute_queries(items: list[CalibItem], seed: int = 0, n: int = 200
                      ) -> list[tuple[str, dict[str, str]]]:
    """Text queries with the attributes they ask for: a noun phrase over two attributes of a
    test clip ("a quiet, low-pitched female voice"), deterministic for a seed."""
    from clapedge.train.attributes import ADJECTIVES, article

    rng = random.Random(seed)
    queries: dict[str, dict[str, str]] = {}
    pool = [it for it in items if it.attributes]
    for _ in range(n * 4):
        if len(queries) >= n or not pool:
            break
        labels = rng.choice(pool).attributes
        usable = [a for a in ADJECTIVES if a not in ("sex", "accent") and labels.get(a)]
        picked = rng.sample(usable, min(2, len(usable)))
        words = [ADJECTIVES[a][labels[a]][0] for a in picked]
        noun = "voice"
        wanted = {a: labels[a] for a in picked}
        if labels.get("sex") and rng.random() < 0.7:
            noun = f"{labels['sex']} voice"
            wanted["sex"] = labels["sex"]
        phrase = ", ".join(words) + " " + noun
        queries[f"{article(phrase).capitalize()} {phrase}."] = wanted
    return list(queries.items())


def evaluate(embedder: Embedder, corpus: str | Path, *, split: str = "test",
             model_name: str = "", limit: int | None = None) -> EvalReport:
    from clapedge.train.attributes import ATTRIBUTES, ORDINAL_ATTRIBUTES, label_prompts

    items = read_source(corpus, split=split)
    if limit:
        items = items[:limit]
    decoded = decode_items(items, embedder.sample_rate)
    items = [it for it, _ in decoded]
    audio = normalize(embedder.embed_audio([sig for _, sig in decoded]))
    report = EvalReport(model=model_name, split=split, clips=len(items))

    for attribute, labels in ATTRIBUTES.items():
        truth = [it.attributes.get(attribute) for it in items]
        keep = [i for i, t in enumerate(truth) if t is not None and t in labels]
        if not keep:
            continue
        prompts = label_prompts(attribute)
        bank = stored_bank(embedder, attribute, prompts)
        if bank is None:
            bank = label_bank(embedder, prompts)
        sims = audio[keep] @ bank.T
        y = np.array([labels.index(truth[i]) for i in keep])
        report.classification[attribute] = metrics.classification(y, sims.argmax(1), len(labels))
        report.classification[attribute]["n"] = len(keep)
        if attribute in ORDINAL_ATTRIBUTES:
            # Expected level under softmax(scale * cos): EmotionRankCLAP's ordinal read-out.
            p = np.exp(20.0 * (sims - sims.max(1, keepdims=True)))
            p /= p.sum(1, keepdims=True)
            report.ordinal[attribute] = metrics.kendall_tau_b(y, p @ np.arange(len(labels)))

    queries = attribute_queries(items)
    if queries:
        text = normalize(embedder.embed_text([q for q, _ in queries]))
        relevant = np.array([[all(it.attributes.get(a) == v for a, v in want.items())
                              for it in items] for _, want in queries])
        report.retrieval["text_to_audio"] = metrics.match_precision_at_k(
            text @ audio.T, relevant, ks=(1, 10))
    captions = [(i, it.captions[0]) for i, it in enumerate(items) if it.captions]
    if captions:
        cap = normalize(embedder.embed_text([c for _, c in captions]))
        idx = np.array([i for i, _ in captions])
        t2a = metrics.recall_at_k(cap @ audio.T, idx)
        a2t = metrics.recall_at_k(audio[idx] @ cap.T, np.arange(len(idx)))
        report.retrieval.setdefault("text_to_audio", {}).update(
            {f"exact {k}": v for k, v in t2a.items()})
        report.retrieval["audio_to_text"] = {f"exact {k}": v for k, v in a2t.items()}
    return report


def open_embedder(path: str | Path, *, providers: str = "auto") -> Embedder:
    """A bundle (manifest.json) runs on the torch-free runtime; a model directory
    (config.json) on PyTorch (needs the [export] or [train] extra)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from clapedge.runtime import Runtime

        return _RuntimeEmbedder(Runtime(path, providers=providers))
    if (path / "config.json").is_file():
        from clapedge.models.embedder import TorchEmbedder

        return TorchEmbedder.from_dir(path)
    raise ClapEdgeError(f"{path}: neither a bundle (manifest.json) nor a model directory "
                        f"(config.json)")


class _RuntimeEmbedder:
    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.sample_rate = runtime.sample_rate

    def embed_audio(self, signals: list[np.ndarray]) -> np.ndarray:
        return self.runtime.embed_audio([(s, self.sample_rate) for s in signals])

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.runtime.embed_text(list(texts))

    def stored_bank(self, name: str, prompts: dict[str, list[str]]) -> np.ndarray | None:
        spec = self.runtime.manifest.banks.get(name)
        wanted = {label: tuple(p) for label, p in prompts.items()}
        if spec is None or list(spec.labels) != list(wanted) or dict(spec.prompts) != wanted:
            return None
        return self.runtime.bundle.bank(name)


def write_report(report: EvalReport, json_path: Path | None, md_path: Path | None) -> None:
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    if md_path:
        md_path.write_text(report.to_markdown())


def main(argv: list[str] | None = None) -> None:
    """clap-eval MODEL CORPUS_DIR [--split test] [--json] [--markdown FILE]."""
    import sys

    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("model", type=click.Path(path_type=Path))
    @click.argument("corpus", type=click.Path(path_type=Path))
    @click.option("--split", default="test", show_default=True)
    @click.option("--limit", type=int, default=None, help="Evaluate the first N clips only.")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("--markdown", type=click.Path(path_type=Path), help="Also write a Markdown table.")
    def cli(model, corpus, split, limit, as_json, markdown):
        """Zero-shot attribute classification, retrieval and ordinal metrics of MODEL (a model
        directory or an exported bundle) on CORPUS (a clap-corpus directory or manifest)."""
        try:
            report = evaluate(open_embedder(model), corpus, split=split, model_name=str(model),
                              limit=limit)
        except ClapEdgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        if markdown:
            markdown.write_text(report.to_markdown())
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        else:
            click.echo(report.to_markdown())

    cli.main(args=argv, standalone_mode=True)

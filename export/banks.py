"""Label banks: prompt ensembles per label, encoded once at export time with the fp32 text
tower (a bank is a constant; encoding it in fp32 costs nothing at run time)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clapedge.errors import ConfigError

# ParaSpeechCLAP's zero-shot label sets (configs/eval/classification/*.yaml) and template.
PARASPEECHCLAP_SETS: dict[str, tuple[str, ...]] = {
    "pitch": ("shrill", "nasal", "deep"),
    "texture": ("silky", "husky", "raspy", "guttural", "vocal-fry"),
    "clarity": ("crisp", "slurred", "lisp", "stammering"),
    "volume": ("booming", "authoritative", "loud", "hushed", "soft"),
    "rhythm": ("flowing", "punctuated", "hesitant", "singsong", "monotonous"),
    "situational": ("angry", "guilt", "scared", "happy", "loud", "sarcastic", "sympathetic",
                    "desirous", "enthusiastic", "saddened", "anxious", "sleepy", "admiring",
                    "disgusted", "awed", "pained", "fast", "calm", "whispered", "enunciated",
                    "confused"),
}
PARASPEECHCLAP_TEMPLATE = "A person is speaking in a {} style."
BUILTIN = ("corpus", "paraspeechclap", "none")


@dataclass(frozen=True)
class BankSource:
    name: str
    prompts: dict[str, list[str]]
    kind: str = "categorical"
    values: dict[str, float] | None = None


def builtin_banks(which: str) -> list[BankSource]:
    if which == "none":
        return []
    if which == "paraspeechclap":
        return [BankSource(name, {label: [PARASPEECHCLAP_TEMPLATE.format(label)] for label in labels})
                for name, labels in PARASPEECHCLAP_SETS.items()]
    if which == "corpus":
        from clapedge.train.attributes import ATTRIBUTES, ORDINAL_ATTRIBUTES, label_prompts

        out = []
        for name, labels in ATTRIBUTES.items():
            ordinal = name in ORDINAL_ATTRIBUTES
            out.append(BankSource(name, label_prompts(name), "ordinal" if ordinal else "categorical",
                                  {label: float(i) for i, label in enumerate(labels)} if ordinal else None))
        return out
    raise ConfigError(f"built-in banks {which!r}: use one of {', '.join(BUILTIN)}")


def read_bank_file(name: str, path: Path) -> BankSource:
    """A JSON file: {label: prompt or [prompts]}, or {"template": "...{}...", "labels": [...]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"label bank {name}: cannot read {path}: {e}") from None
    if isinstance(data, dict) and "labels" in data and "template" in data:
        template = data["template"]
        if not isinstance(template, str) or "{}" not in template:
            raise ConfigError(f"{path}: 'template' must be a string containing {{}}")
        prompts = {str(label): [template.format(label)] for label in data["labels"]}
    elif isinstance(data, dict) and data:
        prompts = {str(k): [v] if isinstance(v, str) else list(v) for k, v in data.items()}
    else:
        raise ConfigError(f"{path}: expected {{label: prompt(s)}} or {{template, labels}}")
    if not all(p and all(isinstance(s, str) and s.strip() for s in p) for p in prompts.values()):
        raise ConfigError(f"{path}: every label needs at least one non-empty prompt")
    return BankSource(name, prompts)


def encode_bank(embed_text, source: BankSource) -> np.ndarray:
    """[n_labels, D] float32: each label's prompt embeddings averaged, re-normalised."""
    rows = []
    for prompts in source.prompts.values():
        mean = np.asarray(embed_text(prompts), dtype=np.float64).mean(axis=0)
        rows.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(rows).astype(np.float32)

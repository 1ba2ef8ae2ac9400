"""Natural-language captions of a clip from its attribute labels.

Each caption describes a random subset of the clip's attributes in one of several sentence
shapes (a clause, a noun phrase, a description, a ParaSpeechCLAP-style tag sentence), with
synonyms drawn from ``attributes.ADJECTIVES`` so that captions and zero-shot prompts share
their words. Deterministic for a given ``random.Random`` state. Plain Python, no torch.
"""

from __future__ import annotations

import random

from clapedge.train.attributes import ADJECTIVES, article, fill

# Adverbials: how a label reads after a verb ("speaks slowly", "in a deep voice").
_ADVERBS: dict[str, dict[str, tuple[str, ...]]] = {
    "rate": {
        "slow": ("slowly", "at a slow pace", "unhurriedly", "at a leisurely pace"),
        "normal": ("at a normal pace", "at a moderate pace", "at a steady pace"),
        "fast": ("quickly", "rapidly", "at a fast pace", "fast"),
    },
    "loudness": {
        "quiet": ("quietly", "softly", "at a low volume", "faintly"),
        "normal": ("at a normal volume", "at a moderate volume", "at medium volume"),
        "loud": ("loudly", "at a high volume", "forcefully"),
    },
    "pitch": {label: tuple(f"in a {w} voice" for w in words)
              for label, words in ADJECTIVES["pitch"].items()},
    "pitch_range": {label: tuple(f"with {w} intonation" for w in words)
                    for label, words in ADJECTIVES["pitch_range"].items()},
    "voice_quality": {
        "modal": ("in a clear voice", "in a plain, smooth voice", "with a clear voice"),
        "whispered": ("in a whisper", "in a breathy whisper", "in a whispered voice"),
        "creaky": ("in a creaky voice", "with a rough, creaky voice", "in a gravelly voice"),
    },
    "accent": {label: tuple(f"with {article(w)} {w} accent" for w in words)
               for label, words in ADJECTIVES["accent"].items()},
    "arousal": {
        "low": ("calmly", "in a relaxed manner", "in a subdued way"),
        "mid": ("in a neutral tone", "in a composed manner", "evenly"),
        "high": ("energetically", "excitedly", "with a lot of energy", "in a lively way"),
    },
}

_NOUNS = {
    "male": ("man", "male speaker", "male talker", "man"),
    "female": ("woman", "female speaker", "female talker", "woman"),
    None: ("person", "speaker"),
}

# The order adjectives take before a noun ("calm, slow, deep male voice").
_ADJ_ORDER = ("arousal", "loudness", "rate", "pitch_range", "pitch", "voice_quality")
_ADVERB_ORDER = ("rate", "loudness", "arousal", "pitch", "pitch_range", "voice_quality",
                 "accent")


def _choose_subset(labels: dict[str, str | None], rng: random.Random) -> list[str]:
    present = [a for a, v in labels.items() if v is not None and a in ADJECTIVES]
    chosen = []
    if "sex" in present and rng.random() < 0.75:
        chosen.append("sex")
    vq = labels.get("voice_quality")
    if vq is not None and rng.random() < (0.85 if vq != "modal" else 0.25):
        chosen.append("voice_quality")
    others = [a for a in present if a not in ("sex", "voice_quality")]
    k = rng.choice((1, 2, 2, 3, 3, 4))
    chosen += rng.sample(others, min(k, len(others)))
    if len([a for a in chosen if a != "sex"]) == 0 and others:
        chosen.append(rng.choice(others))
    return chosen


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _adjective(attr: str, label: str, rng: random.Random) -> str:
    return rng.choice(ADJECTIVES[attr][label])


def _adverbials(attrs: list[str], labels: dict, rng: random.Random) -> str:
    """Single-word adverbs joined with "and", then the prepositional phrases."""
    words, phrases = [], []
    for a in _ADVERB_ORDER:
        if a in attrs:
            adv = rng.choice(_ADVERBS[a][labels[a]])
            (phrases if " " in adv else words).append(adv)
    rng.shuffle(phrases)
    parts = [_join(words)] if words else []
    return " ".join(parts + [", ".join(phrases)] if phrases else parts).strip()


def _clause(attrs: list[str], labels: dict, rng: random.Random) -> str:
    """ "A calm Scottish woman whispers slowly in a low voice." """
    pre = []
    if "arousal" in attrs and rng.random() < 0.5:
        pre.append(_adjective("arousal", labels["arousal"], rng))
        attrs = [a for a in attrs if a != "arousal"]
    if "accent" in attrs and "sex" in attrs and rng.random() < 0.5:
        pre.append(rng.choice(ADJECTIVES["accent"][labels["accent"]][:1]))
        attrs = [a for a in attrs if a != "accent"]
    noun = rng.choice(_NOUNS[labels["sex"] if "sex" in attrs else None])
    verb = rng.choice(("speaks", "talks", "reads a sentence", "says a line"))
    if "voice_quality" in attrs and labels["voice_quality"] == "whispered" and rng.random() < .7:
        verb = rng.choice(("whispers", "whispers a sentence"))
        attrs = [a for a in attrs if a != "voice_quality"]
    if verb.startswith("speaks") and noun.endswith("speaker"):
        verb = "talks"
    if verb.startswith("talks") and noun.endswith("talker"):
        verb = "speaks"
    if rng.random() < 0.3:
        verb = {"speaks": "speaking", "talks": "talking", "reads a sentence": "reading aloud",
                "says a line": "saying a line", "whispers": "whispering",
                "whispers a sentence": "whispering"}[verb]
    subject = fill("a {}", " ".join(pre + [noun]))
    rest = _adverbials(attrs, labels, rng)
    return f"{subject} {verb}{' ' + rest if rest else ''}."


def _noun_phrase(attrs: list[str], labels: dict, rng: random.Random) -> str:
    """ "Fast, loud, high-pitched male speech with a Scottish accent." """
    adjs = [_adjective(a, labels[a], rng) for a in _ADJ_ORDER if a in attrs]
    sex = rng.choice(ADJECTIVES["sex"][labels["sex"]][:2]) if "sex" in attrs else ""
    head = rng.choice(("speech", "voice", "speaking voice", "delivery"))
    text = ", ".join(adjs)
    text = (text + " " if text else "") + (sex + " " if sex else "") + head
    if "accent" in attrs:
        text += " " + rng.choice(_ADVERBS["accent"][labels["accent"]])
    return text[0].upper() + text[1:] + "."


def _description(attrs: list[str], labels: dict, rng: random.Random) -> str:
    """ "The voice is low-pitched, slow and quiet. The speaker is a woman." """
    adjs = [_adjective(a, labels[a], rng) for a in _ADJ_ORDER if a in attrs]
    out = []
    if adjs:
        out.append(f"{rng.choice(('The voice is', 'This voice sounds'))} "
                   f"{_join(adjs)}.")
    if "sex" in attrs:
        out.append(fill("The speaker is a {}.", rng.choice(_NOUNS[labels["sex"]])))
    if "accent" in attrs:
        out.append(fill("The speaker has a {} accent.",
                        rng.choice(ADJECTIVES["accent"][labels["accent"]])))
    rng.shuffle(out)
    return " ".join(out)


def _style_tags(attrs: list[str], labels: dict, rng: random.Random) -> str:
    """ "A female speaker is speaking in a calm, monotone style." """
    adjs = [_adjective(a, labels[a], rng) for a in _ADJ_ORDER if a in attrs]
    who = "A person"
    if "sex" in attrs:
        who = fill("A {} speaker", rng.choice(ADJECTIVES["sex"][labels["sex"]][:2]))
    text = fill(f"{who} is speaking in a {{}} style", ", ".join(adjs)) if adjs else \
        f"{who} is speaking"
    if "accent" in attrs:
        text += " " + rng.choice(_ADVERBS["accent"][labels["accent"]])
    return text + "."


_SHAPES = (_clause, _clause, _noun_phrase, _description, _style_tags)


def make_captions(labels: dict[str, str | None], rng: random.Random, n: int = 4) -> list[str]:
    """``n`` distinct captions of one clip, each describing a random subset of its labels."""
    captions: list[str] = []
    for _ in range(20 * n):
        if len(captions) == n:
            break
        shape = rng.choice(_SHAPES)
        caption = shape(_choose_subset(labels, rng), labels, rng)
        if caption not in captions:
            captions.append(caption)
    return captions

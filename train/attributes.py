"""The speaking-style label vocabulary and the prompts that describe each label.

Plain Python, no torch: the corpus generator, training, evaluation, export (label banks) and
the runtime all read the same definitions from here.

- ``ATTRIBUTES``: attribute name -> its labels, in order (low to high for the ordinal ones).
- ``ORDINAL_ATTRIBUTES``: the attributes whose labels are ordered levels.
- ``ADJECTIVES``: attribute -> label -> descriptive words (the first is the canonical one).
- ``PROMPT_TEMPLATES``: attribute -> templates with one ``{}`` filled by an adjective.
- ``STYLE_TEMPLATE``: the ParaSpeechCLAP tag prompt, "A person is speaking in a {} style."

A clip label may be ``None`` where the attribute does not apply (the pitch of a whisper).
"""

from __future__ import annotations

import re

from clapedge.errors import ConfigError

STYLE_TEMPLATE = "A person is speaking in a {} style."

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sex": ("male", "female"),
    "pitch": ("low", "mid", "high"),
    "pitch_range": ("low", "mid", "high"),
    "rate": ("slow", "normal", "fast"),
    "loudness": ("quiet", "normal", "loud"),
    "voice_quality": ("modal", "whispered", "creaky"),
    "accent": ("american", "british", "scottish", "caribbean", "northern", "midlands"),
    "arousal": ("low", "mid", "high"),
}

ORDINAL_ATTRIBUTES: tuple[str, ...] = ("pitch", "pitch_range", "rate", "loudness", "arousal")

ADJECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "sex": {
        "male": ("male", "masculine", "male-sounding"),
        "female": ("female", "feminine", "female-sounding"),
    },
    "pitch": {
        "low": ("low-pitched", "deep", "low"),
        "mid": ("medium-pitched", "moderately pitched", "mid-pitched"),
        "high": ("high-pitched", "high", "shrill"),
    },
    "pitch_range": {
        "low": ("monotone", "flat", "monotonous"),
        "mid": ("moderately varied", "natural-sounding", "evenly inflected"),
        "high": ("expressive", "animated", "singsong"),
    },
    "rate": {
        "slow": ("slow", "unhurried", "leisurely"),
        "normal": ("normal-paced", "moderately paced", "steady"),
        "fast": ("fast", "rapid", "quick"),
    },
    "loudness": {
        "quiet": ("quiet", "soft", "faint"),
        "normal": ("normal-volume", "moderately loud", "medium-volume"),
        "loud": ("loud", "forceful", "booming"),
    },
    "voice_quality": {
        "modal": ("clear", "plain", "smooth"),
        "whispered": ("whispered", "whispering", "breathy whispered"),
        "creaky": ("creaky", "rough", "gravelly"),
    },
    "accent": {
        "american": ("American", "US English", "General American"),
        "british": ("British", "southern British", "standard British"),
        "scottish": ("Scottish", "Scots", "Scottish English"),
        "caribbean": ("Caribbean", "West Indian", "Caribbean English"),
        "northern": ("northern English", "Lancashire", "northern British"),
        "midlands": ("West Midlands", "Midlands", "Birmingham-area"),
    },
    "arousal": {
        "low": ("calm", "relaxed", "subdued"),
        "mid": ("neutral", "composed", "even-tempered"),
        "high": ("energetic", "excited", "lively"),
    },
}

_DEFAULT_TEMPLATES = (STYLE_TEMPLATE, "A {} voice.", "Someone speaking in a {} voice.")

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sex": ("A {} voice.", "A {} speaker is talking.", "Speech from a {} speaker."),
    "pitch": _DEFAULT_TEMPLATES,
    "pitch_range": (STYLE_TEMPLATE, "Speech with {} intonation.", "A {} voice."),
    "rate": (STYLE_TEMPLATE, "A {} speaker.", "{} speech."),
    "loudness": (STYLE_TEMPLATE, "A {} voice.", "{} speech."),
    "voice_quality": _DEFAULT_TEMPLATES,
    "accent": ("A person speaking with a {} accent.", "English speech in a {} accent."),
    "arousal": (STYLE_TEMPLATE, "A {} speaker.", "A person who sounds {}."),
}


def _check(attribute: str, label: str | None = None) -> None:
    if attribute not in ATTRIBUTES:
        raise ConfigError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
    if label is not None and label not in ATTRIBUTES[attribute]:
        raise ConfigError(f"unknown label {label!r} for attribute {attribute!r}; "
                          f"known: {', '.join(ATTRIBUTES[attribute])}")


def article(word: str) -> str:
    """ "an" before a vowel sound, else "a" (good enough for this vocabulary)."""
    vowel = word[:1].lower() in "aeiou" and not word.startswith(("US", "Uni", "uni"))
    return "an" if vowel else "a"


def fill(template: str, word: str) -> str:
    """``template`` with ``{}`` replaced by ``word``, "a" turned into "an" before a vowel sound,
    and the first letter capitalised."""
    text = template.format(word)
    if article(word) == "an":
        text = re.sub(r"\b([Aa]) " + re.escape(word), r"\1n " + word, text, count=1)
    return text[0].upper() + text[1:]


def label_prompts(attribute: str, words_per_label: int = 2) -> dict[str, list[str]]:
    """The prompt ensemble of every label of ``attribute``, for zero-shot label banks.

    Each label gets every template of the attribute filled with each of its first
    ``words_per_label`` adjectives; a bank averages the embeddings of a label's prompts.
    """
    _check(attribute)
    if words_per_label < 1:
        raise ConfigError(f"words_per_label must be >= 1, got {words_per_label}")
    return {
        label: [fill(t, word) for t in PROMPT_TEMPLATES[attribute]
                for word in ADJECTIVES[attribute][label][:words_per_label]]
        for label in ATTRIBUTES[attribute]
    }


def tag_prompt(attribute: str, label: str) -> str:
    """The single tag prompt of one label: the attribute's first template (the ParaSpeechCLAP
    style template wherever it reads naturally) filled with the canonical adjective."""
    _check(attribute, label)
    return fill(PROMPT_TEMPLATES[attribute][0], ADJECTIVES[attribute][label][0])


def all_tags() -> list[tuple[str, str]]:
    """Every (attribute, label) pair, in a fixed order: the columns of a multi-label target."""
    return [(a, label) for a, labels in ATTRIBUTES.items() for label in labels]


def tag_targets(labels: dict[str, str | None]) -> list[int]:
    """A clip's multi-hot vector over ``all_tags()``; attributes labelled ``None`` stay 0."""
    return [int(labels.get(a) == label) for a, label in all_tags()]


def ordinal_index(attribute: str, label: str | None) -> int | None:
    """The level of an ordinal label (0 = lowest), ``None`` for a missing label."""
    if attribute not in ORDINAL_ATTRIBUTES:
        raise ConfigError(f"{attribute!r} is not ordinal; ordinal: {', '.join(ORDINAL_ATTRIBUTES)}")
    if label is None:
        return None
    _check(attribute, label)
    return ATTRIBUTES[attribute].index(label)

"""The bundle's text tokenizer: an HF ``tokenizers`` file (never ``transformers``).

Truncation to the manifest's ``max_length`` is enabled here; padding is done by
``pad_batch`` with the manifest's ``pad_id``, so the padding the tokenizer file may carry
is ignored (the runtime batches only texts of equal length anyway, see ``api.Runtime``).

Input texts: any Unicode, control characters included; a string that is not valid Unicode
(a lone surrogate, e.g. from ``surrogateescape`` decoding) and a text longer than
``MAX_TEXT_CHARS`` raise ``ConfigError`` naming the text. The tokenizer splits the whole
text before it truncates, in time and memory linear in its length (12 M characters:
about 17 s and 1.5 GB here), hence the limit; a description is a few hundred characters.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from clapedge.errors import BundleError, ConfigError
from clapedge.runtime.manifest import TokenizerSpec

MAX_TEXT_CHARS = 100_000


class TextTokenizer:
    def __init__(self, data: bytes, spec: TokenizerSpec, source: str):
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"{source}: not a valid tokenizers file ({e})") from None
        self._tok.no_padding()
        self._tok.enable_truncation(spec.max_length)
        self.spec = spec

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to ``max_length``)."""
        for i, text in enumerate(texts):
            if len(text) > MAX_TEXT_CHARS:
                raise ConfigError(f"text {i} has {len(text)} characters; at most "
                                  f"{MAX_TEXT_CHARS} are accepted (only the first "
                                  f"{self.spec.max_length} tokens are used anyway)")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ConfigError(f"text {i} is not valid Unicode ({e.reason} at character "
                                  f"{e.start}: {text[e.start:e.end]!r})") from None
        return [e.ids for e in self._tok.encode_batch(texts)]

    def pad_batch(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 [batch, longest], padded with pad_id."""
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.spec.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = x
            mask[row, :len(x)] = 1
        return input_ids, mask

"""clapedge.runtime: the torch-free core that runs a bundle on a device.

Needs only numpy, onnxruntime, soundfile, soxr, tokenizers (and click/rich for the CLIs).

    from clapedge.runtime import Runtime
    rt = Runtime("BUNDLE")                  # Bundle.load + lazy sessions
    rt.tag("speech.wav", bank="emotion", k=3)

Modules: ``manifest`` (the bundle format), ``bundle`` (loading, checksums, sessions),
``providers`` (execution providers, session options), ``audio`` (decoding and the clip
policy), ``tokenizer``, ``api`` (``Runtime``), ``results`` (dataclasses), ``stream``
(sliding-window streaming), ``cli_tag``.
"""

from clapedge.runtime.api import ClapRuntime, Runtime
from clapedge.runtime.audio import frame_windows, load_audio
from clapedge.runtime.bundle import Bundle
from clapedge.runtime.manifest import FORMAT_VERSION, Manifest, read_manifest, write_manifest
from clapedge.runtime.results import AudioEncoding, Ranked, Tag
from clapedge.runtime.stream import AudioStream, StreamEvent

__all__ = [
    "AudioEncoding", "AudioStream", "Bundle", "ClapRuntime", "FORMAT_VERSION", "Manifest",
    "Ranked", "Runtime", "StreamEvent", "Tag", "frame_windows", "load_audio", "read_manifest",
    "write_manifest",
]

"""Every runtime module imports on a device install: no torch, transformers or onnx."""

import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'onnx', 'safetensors'}:
            raise ImportError('blocked in a device install: ' + name)
sys.meta_path.insert(0, Block())
"""

MODULES = ["api", "audio", "benchmark", "bundle", "checksums", "cli_bench", "cli_stream", "cli_tag",
           "manifest", "onnx_external", "providers", "results", "stream", "tokenizer"]


def test_runtime_modules_import_without_torch_or_onnx():
    code = BLOCKER + "".join(f"import clapedge.runtime.{m}\n" for m in MODULES) + (
        "from clapedge.runtime import Runtime, ClapRuntime, Bundle, Tag\n"
        "heavy = {'torch', 'transformers', 'onnx'}\n"
        "assert not any(m.split('.')[0] in heavy for m in sys.modules), 'heavy import'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

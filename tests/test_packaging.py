"""The device install stays small: the runtime and kernels never import torch/transformers."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'onnx', 'safetensors'}:
            raise ImportError('blocked in a device install: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_imports_without_torch():
    code = BLOCKER + (
        "import clapedge, clapedge.runtime, clapedge.kernels\n"
        "assert not any(m.split('.')[0] in {'torch', 'transformers'} for m in sys.modules)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_base_dependencies_exclude_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = " ".join(meta["project"]["dependencies"]).lower()
    for heavy in ("torch", "transformers", "onnx>", "tensorrt"):
        assert heavy not in base, f"{heavy} must stay out of the device install"
    assert any(d.startswith("torch") for d in meta["project"]["optional-dependencies"]["export"])


def test_subpackages_map_to_top_level_folders():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = meta["tool"]["scikit-build"]["wheel"]["packages"]
    for sub in ("runtime", "kernels", "calib", "export", "models", "train", "bench"):
        assert mapping[f"clapedge/{sub}"] == sub
        assert (ROOT / sub / "__init__.py").is_file()

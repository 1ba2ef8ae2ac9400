"""clapedge.export: PyTorch towers -> verified, quantized ONNX bundles (clap-export)."""

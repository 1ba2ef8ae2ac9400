"""Error-compensated rounding of INT8 weights from calibration activations (GPTQ-style).

Rounding every weight to its nearest int8 level is what limits INT8 accuracy here, not the
activations: on the WavLM-base-plus-shaped preset (random init), quantizing only the weights
of every GEMM (per-channel, round-to-nearest) costs as much centred cosine at 10 s (0.991) as
quantizing weights and per-row activations together. Round-to-nearest treats each weight
alone; what matters is the GEMM's output on real inputs, ``X @ W``. With ``H = X^T X`` from
calibration audio, weights are quantized one input row at a time and each row's rounding
error is pushed onto the rows not yet quantized, along the directions the inputs actually
use (Frantar et al., GPTQ, 2022):

    for k in order:            (rows by decreasing H[k, k]: the most used inputs first)
        q[k] = round(W[k] / s)                      s: per-output-channel scale, fixed
        e    = (W[k] - q[k] * s) / U[k, k]          U: upper Cholesky factor of H^-1
        W[k+1:] -= U[k, k+1:]^T e

Scales stay per output channel and symmetric (zero point 0), so the result is an ordinary
int8 weight for MatMulInteger / QDQ / TensorRT; only which integer each weight rounds to
changes. Deterministic for given calibration data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

DAMPING = 0.01  # fraction of the mean diagonal added to H (keeps the inverse well posed)
MAX_ROWS = 1024  # rows of X sampled per clip and tensor (H needs >> K rows, not all frames)


def activations(model: onnx.ModelProto | Path, names: list[str],
                feeds: list[dict[str, np.ndarray]], *, threads: int = 0):
    """Yields {name: value} of the intermediate tensors ``names`` for each feed, running the
    float model on one feed at a time (memory is one input's activations)."""
    import onnxruntime as ort

    model = onnx.load(str(model)) if isinstance(model, Path) else model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = sorted(set(names))
    for name in wanted:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    # Extra outputs of intermediate tensors: keep the graph as written (no fusions across them).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    for feed in feeds:
        yield dict(zip(wanted, session.run(wanted, feed)))


def collect_hessians(model_path: Path, inputs: dict[str, str], feeds: list[dict[str, np.ndarray]],
                     *, seed: int = 0, threads: int = 0) -> dict[str, np.ndarray]:
    """``inputs``: node name -> the name of its activation input. Runs the float model on each
    feed (one at a time) and returns node -> X^T X / rows."""
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for values in activations(Path(model_path), list(inputs.values()), feeds, threads=threads):
        for name, x in values.items():
            x = x.reshape(-1, x.shape[-1]).astype(np.float32)
            if len(x) > MAX_ROWS:
                x = x[np.sort(rng.choice(len(x), MAX_ROWS, replace=False))]
            sums[name] = sums.get(name, 0.0) + (x.T @ x).astype(np.float64)
            rows[name] = rows.get(name, 0) + len(x)
    return {node: sums[tensor] / rows[tensor] for node, tensor in inputs.items()}


def gptq_int8(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray,
              block: int = 128) -> np.ndarray:
    """weight [K, N] (y = x @ W), hessian [K, K], scale [N] -> int8 [K, N]. float32 linear
    algebra in torch (the [export] extra has it; numpy's LAPACK is several times slower)."""
    import torch

    k = weight.shape[0]
    w = torch.from_numpy(weight.astype(np.float32)).clone()
    h = torch.from_numpy(np.asarray(hessian, np.float32)).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = torch.argsort(-torch.diagonal(h), stable=True)
    w, h = w[order], h[order][:, order]
    h.diagonal().add_(DAMPING * float(torch.diagonal(h).mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even damped: plain rounding
        return np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    s = torch.from_numpy(scale.astype(np.float32))
    q = torch.empty_like(w)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[start:end].clone()
        err = torch.empty_like(wb)
        for i in range(end - start):
            qi = torch.clamp(torch.round(wb[i] / s), -127, 127)
            q[start + i] = qi
            e = (wb[i] - qi * s) / u[start + i, start + i]
            wb[i + 1:] -= torch.outer(u[start + i, start + i + 1:end], e)
            err[i] = e
        w[end:] -= u[start:end, end:].T @ err
    out = torch.empty_like(q)
    out[order] = q
    return out.numpy().astype(np.int8)


def gptq_weights(model_path: Path, nodes: list[str], feeds: list[dict[str, np.ndarray]], *,
                 seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """node -> (int8 weight [K, N], per-channel scale [N]) for the named weight GEMMs of the
    float model, rounded against calibration activations (``feeds``)."""
    from clapedge.export.rowwise import _as_matmul, _weight_int8

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.name in nodes:
            got = _as_matmul(node, inits)
            if got is not None:
                found[node.name] = (node.input[0], got[0].astype(np.float32))
    del model, inits
    hessians = collect_hessians(model_path, {n: x for n, (x, _) in found.items()}, feeds, seed=seed)
    out = {}
    for name, (_, weight) in found.items():
        _, scale = _weight_int8(weight)
        out[name] = (gptq_int8(weight, hessians[name], scale), scale)
    return out

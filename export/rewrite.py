"""Exact PyTorch-level rewrites applied before tracing, for speed after quantization.

The conv front end of wav2vec2/HuBERT/WavLM is a stack of strided 1-D convolutions: 35% of
the FLOPs of a Base model. onnxruntime runs Conv1d in float near its fp32 GEMM rate, and its
int8 conv path (ConvInteger) is several times slower than float. Written as GEMMs over
frames gathered by reshapes, in [batch, time, channels] layout, the same math becomes weight
MatMuls that quantize like every other linear layer (u8 x s8 on VNNI/AMX), and the gathers
stay cheap reshapes:

* k == s: frames are a reshape of the input;
* k == 2s (the first conv, k=10 s=5): two reshapes (this block and the next) concatenated;
* s < k < 2s (k=3 s=2): a reshape plus k - s strided slices.

For frame t the GEMM input is [x[s*t], ..., x[s*t + k - 1]] (tap-major, channel-minor), so
the weight is conv.weight [Cout, Cin, k] permuted to [k, Cin, Cout] and flattened to
[k*Cin, Cout]. Results equal the convolution up to float summation order (checked by the
export parity test at cosine >= 0.9999).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clapedge.models.audio import AudioTower, conv_output_lengths, length_mask


def gather_frames(h: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """[B, T, C] -> [B, n, kernel*C] with n = (T - kernel) // stride + 1."""
    batch, length, channels = h.shape
    n = (length - kernel) // stride + 1
    if kernel == stride:
        return h[:, : stride * n].reshape(batch, n, stride * channels)
    if kernel == 2 * stride:
        first = h[:, : stride * n].reshape(batch, n, stride * channels)
        second = h[:, stride: stride * n + stride].reshape(batch, n, stride * channels)
        return torch.cat([first, second], dim=-1)
    if stride < kernel < 2 * stride:
        main = h[:, : stride * n].reshape(batch, n, stride * channels)
        extra = [h[:, stride + j: stride + j + stride * (n - 1) + 1: stride]
                 for j in range(kernel - stride)]
        return torch.cat([main] + extra, dim=-1)
    taps = [h[:, j: j + stride * (n - 1) + 1: stride] for j in range(kernel)]
    return torch.cat(taps, dim=-1)


def masked_group_norm_last(h: torch.Tensor, mask: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over time for [B, F, C] with statistics over valid frames only (the
    channel-last twin of ``models.audio.masked_group_norm``).

    The sums over time are mask-row x frames matmuls ([B, 1, F] @ [B, F, C]): onnxruntime
    reduces a middle axis of a channel-last tensor about 30x slower than a matmul reads it
    (measured: ReduceSum over T of [1, 32000, 512] 124 ms, the matmul a few ms), and the
    square is a Mul, not a Pow. Two passes (mean, then centred second moment), like the
    reference, so no cancellation."""
    batch, frames, channels = h.shape
    groups = norm.num_groups
    per_group = channels // groups
    weights = mask.to(h.dtype).reshape(batch, 1, frames)
    count = (weights.sum(dim=2, keepdim=True) * per_group).clamp(min=1.0)  # [B, 1, 1]

    def group_sum(x: torch.Tensor) -> torch.Tensor:  # [B, F, C] -> [B, 1, C], per group
        s = torch.matmul(weights, x)
        if per_group > 1:
            s = s.reshape(batch, 1, groups, per_group).sum(dim=3, keepdim=True)
            s = s.expand(batch, 1, groups, per_group).reshape(batch, 1, channels)
        return s

    mean = group_sum(h) / count
    centred = h - mean
    var = group_sum(centred * centred) / count
    normed = centred * torch.rsqrt(var + norm.eps)
    if norm.affine:
        normed = normed * norm.weight + norm.bias
    return normed


FOLD_MAX_K = 64  # fold GroupNorm into the GEMM when the frames are this narrow (conv 0: K=10)


def folded_group_norm_gemm(frames: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm(frames @ W + b) over valid frames, without materialising the un-normalised
    output: the conv is linear, so its per-channel mean over time is mean(frames) @ W + b and
    its variance is diag(W^T Cov(frames) W), from the K x K covariance of the frames (K = 10
    for the first conv of wav2vec2/HuBERT/WavLM). The normalisation then folds into a
    per-clip weight and bias: one GEMM writes the normalised [B, F, C] tensor, instead of a
    GEMM and five passes over it (a 10 s clip: 32,000 x 512 floats per pass)."""
    batch, n_frames, _ = frames.shape
    channels = weight.shape[1]
    groups = norm.num_groups
    per_group = channels // groups
    w = mask.to(frames.dtype).reshape(batch, 1, n_frames)
    count = w.sum(dim=2, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
    mean_frame = torch.matmul(w, frames) / count  # [B, 1, K]
    centred = frames - mean_frame
    cov = torch.matmul(centred.transpose(1, 2) * w, centred) / count  # [B, K, K]
    mu = torch.matmul(mean_frame, weight)  # [B, 1, C]
    if bias is not None:
        mu = mu + bias
    var_c = (torch.matmul(cov, weight) * weight).sum(dim=1, keepdim=True)  # [B, 1, C]
    if per_group > 1:
        mu_g = mu.reshape(batch, 1, groups, per_group).mean(dim=3, keepdim=True)
        spread = (mu.reshape(batch, 1, groups, per_group) - mu_g) ** 2
        var_g = (var_c.reshape(batch, 1, groups, per_group) + spread).mean(dim=3, keepdim=True)
        mu_g = mu_g.expand(batch, 1, groups, per_group).reshape(batch, 1, channels)
        var_g = var_g.expand(batch, 1, groups, per_group).reshape(batch, 1, channels)
    else:
        mu_g, var_g = mu, var_c
    scale = torch.rsqrt(var_g + norm.eps)  # [B, 1, C]
    if norm.affine:
        scale = scale * norm.weight
    shift = -mu_g * scale if bias is None else (bias - mu_g) * scale
    if norm.affine:
        shift = shift + norm.bias
    # The shift rides in the GEMM as a (K+1)-th weight row against a column of ones: no
    # separate pass over the [B, F, C] output to add it.
    ones = torch.ones_like(frames[..., :1])
    folded = torch.cat([weight * scale, shift], dim=1)  # [B, K + 1, C]
    return torch.matmul(torch.cat([frames, ones], dim=-1), folded)


class GemmConvLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        conv: nn.Conv1d = layer.conv
        if conv.groups != 1 or conv.dilation[0] != 1 or conv.padding[0] != 0:
            raise ValueError("only plain strided convolutions are rewritten")
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        w = conv.weight.detach()
        self.weight = nn.Parameter(w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous(),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=False)
        self.norm = getattr(layer, "layer_norm", None)
        self.activation = layer.activation

    def forward(self, h: torch.Tensor, frame_mask_fn) -> torch.Tensor:
        frames = gather_frames(h, self.kernel, self.stride)
        if isinstance(self.norm, nn.GroupNorm) and frames.shape[-1] <= FOLD_MAX_K:
            return self.activation(folded_group_norm_gemm(
                frames, frame_mask_fn(frames.shape[1]), self.weight, self.bias, self.norm))
        y = frames @ self.weight
        if self.bias is not None:
            y = y + self.bias
        if isinstance(self.norm, nn.GroupNorm):
            y = masked_group_norm_last(y, frame_mask_fn(y.shape[1]), self.norm)
        elif self.norm is not None:
            y = self.norm(y)
        return self.activation(y)


class GemmFrontEnd(nn.Module):
    """Replaces ``AudioTower._conv_features``: (wave [B, T], lengths [B]) -> [B, F, C]."""

    def __init__(self, tower: AudioTower) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GemmConvLayer(layer)
                                    for layer in tower.base.feature_extractor.conv_layers)
        self.kernels, self.strides = list(tower.kernels), list(tower.strides)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = wave.unsqueeze(-1)
        for i, layer in enumerate(self.layers):
            valid = conv_output_lengths(lengths, self.kernels[: i + 1], self.strides[: i + 1])
            h = layer(h, lambda frames, valid=valid: length_mask(valid, frames))
        return h


def with_gemm_front_end(model: nn.Module) -> nn.Module:
    """A deep copy of a ClapModel whose audio tower runs the GEMM front end (the original
    model is left untouched)."""
    model = copy.deepcopy(model).eval()
    tower: AudioTower = model.audio_branch
    front = GemmFrontEnd(tower)
    tower.gemm_front_end = front  # registered, so export sees its weights as parameters
    object.__setattr__(tower, "_conv_features", front)
    return model

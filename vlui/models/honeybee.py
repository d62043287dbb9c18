"""The Honeybee C-Abstractor projector of 360VL, without timm.

360VL builds it from timm 0.6.13's `RegStage` with `stride=1, dilation=1, act_layer=nn.SiLU,
norm_layer=LayerNorm2d` and the Bottleneck defaults (bottle_ratio 1, group_size 1 i.e. a depthwise
3x3, se_ratio 0.25 of the block's *input* channels, conv1x1 shortcut only when channels change,
SiLU after the residual add). timm maps that norm to `LayerNormAct2d`, whose eps is 1e-5.
The module names below reproduce timm's, so the official checkpoint's keys load unchanged:

    net.0.b1.conv1.conv.weight, net.0.b1.conv1.bn.{weight,bias}, net.0.b1.conv2..., net.0.b1.se.fc1...,
    net.0.b1.conv3..., [net.0.b1.downsample...], net.1 (pooling), net.2.b1..., readout.0, readout.2, pos_emb
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, then an optional SiLU (timm's LayerNormAct2d)."""

    def __init__(self, channels: int, apply_act: bool = True, eps: float = 1e-5):
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=(kernel_size - 1) // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)  # timm keeps the name "bn" for any norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from the global average."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class Bottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, 1)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, groups=out_chs)
        self.se = SEModule(out_chs, int(round(in_chs * se_ratio)))
        self.conv3 = ConvNormAct(out_chs, out_chs, 1, apply_act=False)
        self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else None
        self.act3 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + shortcut)


class RegStage(nn.Sequential):
    """`depth` bottlenecks named b1..bN (timm's naming)."""

    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))


def interpolate_pos_emb(pos_emb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[1+S*S, C] table (first row unused) -> [num_tokens, C], bicubic-resized in fp32 like the original."""
    table = pos_emb[1:]
    src = int(math.isqrt(table.shape[0]))
    dst = int(math.isqrt(num_tokens))
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class CAbstractor(nn.Module):
    """Tokens [B, L, C_in] on a square grid -> [B, num_queries (+eos), C_out]."""

    def __init__(self, cfg: dict, num_input_tokens: int, output_hidden_size: int):
        super().__init__()
        enc, hidden = cfg["encoder_hidden_size"], cfg["hidden_size"]
        depth, mlp_depth, queries = cfg["depth"], cfg["mlp_depth"], cfg["num_queries"]
        side = math.isqrt(queries)
        if side * side != queries:
            raise ValueError(f"C-Abstractor num_queries must be a square number, got {queries}")
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, enc)) if cfg.get("pos_emb", True) else None
        self.prenorm = nn.LayerNorm(enc) if cfg.get("prenorm", False) else None
        eos = cfg.get("num_eos_tokens", 0)
        self.eos_tokens = nn.Parameter(torch.zeros(1, eos, output_hidden_size)) if eos else None
        self.net = nn.Sequential(RegStage(depth, enc, hidden), nn.AdaptiveAvgPool2d((side, side)), RegStage(depth, hidden, hidden))
        layers: list[nn.Module] = [nn.Linear(hidden, output_hidden_size)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(output_hidden_size, output_hidden_size)]
        self.readout = nn.Sequential(*layers)
        self.num_output_tokens = queries + eos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm is not None:
            x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + interpolate_pos_emb(self.pos_emb[0], x.shape[1]).to(x.device)
        batch, length, channels = x.shape
        side = math.isqrt(length)
        x = x.reshape(batch, side, side, channels).permute(0, 3, 1, 2)  # row-major grid, NCHW
        x = self.net(x)
        x = self.readout(x.flatten(2).transpose(1, 2))
        if self.eos_tokens is not None:
            x = torch.cat([x, self.eos_tokens.expand(batch, -1, -1)], dim=1)
        return x

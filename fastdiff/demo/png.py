"""Minimal PNG writing (8-bit grayscale or RGB) with zlib, and an image grid.

The demo writes its PNG with the standard library rather than Pillow: a grayscale grid is a
dozen lines of the PNG format (signature, IHDR, one zlib-compressed IDAT, IEND), and it
keeps `python -m fastdiff demo` free of an imaging dependency.
"""
from __future__ import annotations

import struct
import zlib

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W) grayscale or (H, W, 3) RGB uint8 tensor."""
    rgb = pixels.dim() == 3 and pixels.shape[2] == 3
    if pixels.dtype != torch.uint8 or not (pixels.dim() == 2 or rgb):
        raise ValueError(f"pixels: expected a (H, W) or (H, W, 3) uint8 tensor, "
                         f"got {tuple(pixels.shape)} {pixels.dtype}")
    h, w = pixels.shape[:2]
    rows = pixels.cpu().contiguous().numpy().reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if rgb else 0, 0, 0, 0)  # 8-bit, gray/RGB, deflate, no filter/interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (clamped) -> uint8 0..255, on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, ncol: int = 10, pad: int = 1, scale: int = 2) -> torch.Tensor:
    """(N, C, H, W) images (C = 1 or 3; float in [-1, 1] or uint8) -> one uint8 grid, (H', W') for
    one channel, (H', W', 3) for three: `ncol` images a row, `pad` pixels of gap, each pixel
    repeated `scale` times."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {c}")
    x = (images.cpu() if images.dtype == torch.uint8 else to_uint8(images)).permute(0, 2, 3, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        h, w = h * scale, w * scale
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 64, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def save_png_grid(path: str, images: torch.Tensor, ncol: int = 10, scale: int = 2) -> None:
    with open(path, "wb") as f:
        f.write(encode_png(image_grid(images, ncol=ncol, scale=scale)))

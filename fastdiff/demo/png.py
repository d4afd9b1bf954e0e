"""Minimal PNG writing (8-bit grayscale) with zlib, and an image grid.

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


def encode_png_gray(pixels: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W) uint8 tensor."""
    if pixels.dim() != 2 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels: expected a (H, W) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")
    h, w = pixels.shape
    rows = pixels.cpu().contiguous().numpy()
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no filter/interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def image_grid(images: torch.Tensor, ncol: int = 10, pad: int = 1, scale: int = 2) -> torch.Tensor:
    """(N, 1, H, W) images in [-1, 1] -> one (H', W') uint8 grid, `ncol` images a row,
    `pad` pixels of gap, each pixel repeated `scale` times."""
    n, c, h, w = images.shape
    if c != 1:
        raise ValueError(f"images: expected 1 channel, got {c}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    if scale > 1:
        x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        h, w = h * scale, w * scale
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 64, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i]
    return grid


def save_png_grid(path: str, images: torch.Tensor, ncol: int = 10, scale: int = 2) -> None:
    with open(path, "wb") as f:
        f.write(encode_png_gray(image_grid(images, ncol=ncol, scale=scale)))

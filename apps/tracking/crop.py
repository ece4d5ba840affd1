"""Square crops around a target, resampled to the network's input size.

One bilinear ``grid_sample`` does crop + resize + padding: the image mean is subtracted first
and added back after, so regions outside the frame are filled with the per-channel mean, as
SiamFC/SiamRPN's ``get_subwindow`` does (zero padding would make the border look like a
strong edge to the network).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(1, 3, H, W) float32`` in [0, 255]."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}.")
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).unsqueeze(0).float()


def crop_and_resize(img: torch.Tensor, centers: Union[Sequence[float], torch.Tensor],
                    sizes: Union[float, torch.Tensor], out_size: int,
                    fill: torch.Tensor = None) -> torch.Tensor:
    """Crop squares of side ``sizes`` centred at ``centers`` and resize them to ``out_size``.

    Args:
        img: ``(1, 3, H, W)`` or ``(B, 3, H, W)`` float image(s) on any device; a single image
            is shared by all crops. The crops are computed on ``img``'s device.
        centers: ``(B, 2)`` or ``(2,)`` crop centres ``(cx, cy)`` in continuous pixel coordinates.
        sizes: ``(B,)`` or scalar crop side lengths in pixels.
        out_size: output side.
        fill: ``(B or 1, 3)`` padding colour; default the per-image channel mean.
    Returns:
        ``(B, 3, out_size, out_size)`` float32.
    """
    dev = img.device
    centers = torch.as_tensor(centers, dtype=torch.float32, device=dev).reshape(-1, 2)
    sizes = torch.as_tensor(sizes, dtype=torch.float32, device=dev).reshape(-1)
    b = max(centers.shape[0], sizes.shape[0])
    centers = centers.expand(b, 2)
    sizes = sizes.expand(b)
    _, _, h, w = img.shape
    if fill is None:
        fill = img.mean(dim=(2, 3))
    fill = fill.reshape(-1, 3, 1, 1)
    src = img - fill
    if src.shape[0] == 1 and b > 1:
        src = src.expand(b, -1, -1, -1)
    # Output pixel j covers [c - s/2 + j*s/n, c - s/2 + (j+1)*s/n); sample at its centre.
    t = (torch.arange(out_size, dtype=torch.float32, device=dev) + 0.5) / out_size - 0.5  # (n,)
    xs = centers[:, 0, None] + t[None] * sizes[:, None]  # (B, n)
    ys = centers[:, 1, None] + t[None] * sizes[:, None]
    # With align_corners=False, -1 and +1 are the outer edges of the border pixels, i.e. the
    # continuous coordinates 0 and W, so x maps to 2x/W - 1.
    gx = 2 * xs / w - 1
    gy = 2 * ys / h - 1
    grid = torch.stack([gx[:, None, :].expand(b, out_size, out_size),
                        gy[:, :, None].expand(b, out_size, out_size)], dim=-1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill

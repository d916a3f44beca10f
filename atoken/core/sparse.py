"""SparseTensor: row features plus integer coordinates, the official container (§1.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseTensor:
    """Features ``[N, C]`` with coordinates ``[N, 5]`` int32 ``(b, t, x, y, z)``.

    The Gaussian decoder uses 4 columns ``(b, x, y, z)``. Rows of one batch item are
    contiguous and batch items appear in ascending order starting at 0.
    """

    feats: Tensor
    coords: Tensor

    def __post_init__(self) -> None:
        if self.feats.dim() < 1 or self.coords.dim() != 2:
            raise ValueError(
                f"SparseTensor needs feats [N, ...] and coords [N, D], got "
                f"{tuple(self.feats.shape)} and {tuple(self.coords.shape)}"
            )
        if self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"feats and coords disagree on the number of rows: "
                f"{self.feats.shape[0]} vs {self.coords.shape[0]}"
            )
        if self.coords.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"coords must be integer, got {self.coords.dtype}")

    @property
    def batch_size(self) -> int:
        """Number of batch items (max b + 1; 0 for an empty tensor)."""
        if self.coords.shape[0] == 0:
            return 0
        return int(self.coords[:, 0].max()) + 1

    def seqlens(self) -> list[int]:
        """Rows per batch item, in batch order (an item without rows counts 0)."""
        if self.coords.shape[0] == 0:
            return []
        counts = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)
        return counts.tolist()

    def item_slices(self) -> list[slice]:
        """Row range of each batch item (rows of one item are contiguous)."""
        out, start = [], 0
        for n in self.seqlens():
            out.append(slice(start, start + n))
            start += n
        return out

    def replace(self, feats: Tensor) -> SparseTensor:
        """Same coordinates, new features."""
        return SparseTensor(feats, self.coords)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move feats (and coords, keeping their integer dtype) to a device / feats to a dtype."""
        return SparseTensor(
            self.feats.to(device=device, dtype=dtype),
            self.coords.to(device=device) if device is not None else self.coords,
        )

    @property
    def device(self) -> torch.device:
        """Device of the features."""
        return self.feats.device

    def __len__(self) -> int:
        return self.feats.shape[0]

    def __repr__(self) -> str:
        return (
            f"SparseTensor(feats={tuple(self.feats.shape)} {self.feats.dtype}, "
            f"coords={tuple(self.coords.shape)}, batch={self.batch_size})"
        )


def check_contiguous_batches(coords: Tensor) -> None:
    """Raise if batch ids are not non-decreasing (rows of an item must be contiguous)."""
    if coords.shape[0] > 1:
        b = coords[:, 0]
        if bool((b[1:] < b[:-1]).any()):
            raise ValueError("rows of one batch item must be contiguous with batch ids ascending")


def cat_sparse(items: list[SparseTensor]) -> SparseTensor:
    """Concatenate single-item sparse tensors into one batch, renumbering b = list index."""
    feats, coords = [], []
    for b, item in enumerate(items):
        c = item.coords.clone()
        c[:, 0] = b
        feats.append(item.feats)
        coords.append(c)
    return SparseTensor(torch.cat(feats), torch.cat(coords))

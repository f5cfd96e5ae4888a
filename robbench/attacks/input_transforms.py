"""Input transforms applied to the attack's input before each gradient forward (not to the iterate).

:class:`DiverseInput` is the random resize-and-pad of DI2-FGSM / M-DI2-FGSM (Xie et al. 2019,
cihangxie/DI-2-FGSM ``attack.py:input_diversity``). The original, for 299x299 Inception inputs, redraws
every iteration, with one coin per *batch* of probability p, a nearest-neighbour resize to
rnd ~ U{299..329} and a zero pad at a random offset to 330x330 (the same for the whole batch), fed to
the network at 330x330.

CIFAR scale (the DVERGE transfer attacks; the exact port is unknown, notes §4 "Unknowns"): robbench
resizes to U{size .. pad_to-1} and pads to ``pad_to = int(size * 36 / 32)`` (32 -> U{32..35}, pad 36;
8 -> U{8..8}, pad 9), then resizes back to the model's input size with bilinear interpolation
(``resize_back=True``) so any network accepts it; ``resize_back=False`` feeds the padded image as the
original does (fine for nets with global pooling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _randint(low: int, high_exclusive: int, generator: torch.Generator | None, device: torch.device) -> int:
    if high_exclusive <= low:
        return low
    return int(torch.randint(low, high_exclusive, (1,), generator=generator, device=device).item())


@dataclass
class DiverseInput:
    """Random resize-and-pad with probability ``p`` per batch, redrawn at every call.

    p = 0.5: DVERGE appendix ("0.5 as the input transformation probability for M-DI2-FGSM").
    ``resize_range`` (inclusive) and ``pad_to`` default to the CIFAR scaling described above.
    """

    p: float = 0.5
    resize_range: tuple[int, int] | None = None
    pad_to: int | None = None
    resize_back: bool = True

    def sizes(self, size: int) -> tuple[int, int, int]:
        """(low, high inclusive, pad_to) for an input of side ``size``."""
        pad_to = self.pad_to if self.pad_to is not None else int(size * 36 / 32)
        lo, hi = self.resize_range if self.resize_range is not None else (size, pad_to - 1)
        if not (1 <= lo <= hi <= pad_to):
            raise ValueError(f"DiverseInput needs 1 <= low <= high <= pad_to, got {lo}, {hi}, {pad_to}")
        return lo, hi, pad_to

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = x.device if generator is None else generator.device
        # one coin per batch (the original draws tf.random_uniform(shape=[1]) once per graph step)
        coin = float(torch.rand((1,), generator=generator, device=dev).item())
        if coin >= self.p:
            return x
        h, w = x.shape[-2:]
        lo, hi, pad_to = self.sizes(int(h))
        rnd = _randint(lo, hi + 1, generator, dev)
        out = F.interpolate(x, size=(rnd, rnd), mode="nearest")
        rem = pad_to - rnd
        # tf.random_uniform((), 0, rem) excludes rem: offsets in U{0 .. rem-1} (0 when rem == 0)
        top = _randint(0, rem, generator, dev)
        left = _randint(0, rem, generator, dev)
        out = F.pad(out, (left, rem - left, top, rem - top), value=0.0)
        if self.resize_back and (pad_to != h or pad_to != w):
            out = F.interpolate(out, size=(int(h), int(w)), mode="bilinear", align_corners=False)
        return out

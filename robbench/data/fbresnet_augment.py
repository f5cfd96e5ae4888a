"""The ``fbresnet`` ImageNet training recipe: tensorpack's ``fbresnet_augmentor`` as Xie & Yuille train with it.

Source: facebookresearch/ImageNet-Adversarial-Training ``third_party/imagenet_utils.py fbresnet_augmentor(True)``
(fed by ``third_party/serve-data.py``: cv2 BGR uint8 images, ``AugmentImageComponent``), with the
augmentors of tensorpack ``dataflow/imgaug`` (``crop.py``, ``imgproc.py``, ``meta.py``; tensorpack >= 0.9.8,
the version the reference's INSTRUCTIONS.md requires). Per image, in this order:

1. GoogLeNet crop (``GoogleNetRandomCropAndResize``): area fraction U(0.08, 1), aspect ratio **uniform**
   in (0.75, 1.333) (torchvision draws it log-uniformly), width and height rounded half up and swapped with
   probability 0.5, 10 tries, else resize the short side to 224 and centre-crop; resized to 224x224 with
   bicubic interpolation (``interp=cv2.INTER_CUBIC``).
2. In a random order (``RandomOrderAug``, one permutation per image), each always applied:
   - brightness (``BrightnessScale((0.6, 1.4))``): x * v, v ~ U(0.6, 1.4);
   - contrast (``Contrast((0.6, 1.4))``, ``rgb=None``): x * r + m * (1 - r), m the mean of each channel over
     the image, r ~ U(0.6, 1.4);
   - saturation (``Saturation(0.4, rgb=False)`` on BGR, i.e. the proper luma): x * s + g * (1 - s), g the
     8-bit gray image, s = 1 + U(-0.4, 0.4);
   - lighting (``Lighting(0.1, eigval, eigvec)``, the AlexNet PCA noise of fb.resnet.torch): x + V (a * e),
     a ~ N(0, 0.1^2) per channel, e = (0.2175, 0.0188, 0.0045) * 255 and V the eigenvectors (columns).
3. Horizontal flip with probability 0.5 (``Flip(horiz=True)``).

Details that follow from the reference's data types:
- The image stays uint8 from decoding to the model's input placeholder (``ImageNetModel.image_dtype =
  tf.uint8``), so every colour step ends with a clip to [0, 255] and a cast that truncates to an integer
  (tensorpack clips whenever the input is uint8; the ``clip=False`` it passes changes nothing there). Here the
  steps work on integer values held in float64 and end with ``floor(clip(., 0, 255))``, the same numbers.
- The reference works in BGR with the eigen-constants reversed (``[::-1]`` and ``[::-1, ::-1]``): that is the
  same offset per colour as fb.resnet.torch's RGB constants used here on RGB images, with the three a's
  permuted, which does not change their distribution.
- The 8-bit gray image is OpenCV's ``cvtColor(..., COLOR_BGR2GRAY)`` for uint8: (4899 R + 9617 G + 1868 B
  + 2^13) >> 14.

Differences that remain [deviation]: PIL's bicubic resize (antialiased when it shrinks) is not OpenCV's
INTER_CUBIC; random numbers come from torch generators, not numpy's; tensorpack releases before 2019-01-09
(the reference's first commit asked for >= 0.9.1) took the contrast mean over a gray image, not per channel.
Evaluation under this recipe is the reference's ``fbresnet_augmentor(False)``: short side 256 (bicubic) and a
224 centre crop.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

# fb.resnet.torch's ImageNet PCA (datasets/imagenet.lua pca), RGB order, as tensorpack copies it (x 255).
EIGVAL = (0.2175 * 255.0, 0.0188 * 255.0, 0.0045 * 255.0)
EIGVEC = ((-0.5675, 0.7192, 0.4009),
          (-0.5808, -0.0045, -0.8140),
          (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1               # imagenet_utils.py Lighting(0.1, ...)
BRIGHTNESS_RANGE = (0.6, 1.4)    # imagenet_utils.py BrightnessScale((0.6, 1.4))
CONTRAST_RANGE = (0.6, 1.4)      # imagenet_utils.py Contrast((0.6, 1.4))
SATURATION_ALPHA = 0.4           # imagenet_utils.py Saturation(0.4)
AREA_RANGE = (0.08, 1.0)         # tensorpack GoogleNetRandomCropAndResize defaults
ASPECT_RANGE = (0.75, 1.333)
COLOUR_STEPS = ("brightness", "contrast", "saturation", "lighting")  # the list order inside RandomOrderAug


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64).item()


def _to_uint8_values(x: torch.Tensor) -> torch.Tensor:
    """What ``np.clip(img, 0, 255).astype(np.uint8)`` keeps: integers 0..255 (truncation = floor here)."""
    return x.clamp_(0.0, 255.0).floor_()


def googlenet_crop_params(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of tensorpack's GoogLeNet crop, or None for its fallback (resize + centre crop)."""
    area = height * width
    for _ in range(10):
        target = _uniform(g, *AREA_RANGE) * area
        aspect = _uniform(g, *ASPECT_RANGE)
        ww = int(math.sqrt(target * aspect) + 0.5)
        hh = int(math.sqrt(target / aspect) + 0.5)
        if torch.rand(1, generator=g).item() < 0.5:
            ww, hh = hh, ww
        if hh <= height and ww <= width:
            left = int(torch.randint(0, width - ww + 1, (1,), generator=g))
            top = int(torch.randint(0, height - hh + 1, (1,), generator=g))
            return top, left, hh, ww
    return None


def gray_u8(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit gray of an RGB image of integer values (3×H×W float) -> H×W float integers."""
    r, gch, b = x.to(torch.int64)
    return ((4899 * r + 9617 * gch + 1868 * b + (1 << 13)) >> 14).to(x.dtype)


def brightness(x: torch.Tensor, v: float) -> torch.Tensor:
    return _to_uint8_values(x * v)


def contrast(x: torch.Tensor, r: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2), keepdim=True)  # per channel (tensorpack Contrast rgb=None)
    return _to_uint8_values(x * r + mean * (1.0 - r))


def saturation(x: torch.Tensor, s: float) -> torch.Tensor:
    return _to_uint8_values(x * s + gray_u8(x)[None] * (1.0 - s))


def lighting_offset(alpha: Sequence[float]) -> torch.Tensor:
    """The per-channel offset V (a * e) that lighting adds, for the three a's."""
    v = torch.tensor(EIGVEC, dtype=torch.float64)
    return v @ (torch.as_tensor(alpha, dtype=torch.float64) * torch.tensor(EIGVAL, dtype=torch.float64))


def lighting(x: torch.Tensor, alpha: Sequence[float]) -> torch.Tensor:
    return _to_uint8_values(x + lighting_offset(alpha)[:, None, None])


def colour_params(g: torch.Generator) -> dict[str, Any]:
    """One image's draws: the step order, then each step's factor (tensorpack draws them in this order)."""
    order = [COLOUR_STEPS[int(k)] for k in torch.randperm(len(COLOUR_STEPS), generator=g)]
    return {
        "order": order,
        "brightness": _uniform(g, *BRIGHTNESS_RANGE),
        "contrast": _uniform(g, *CONTRAST_RANGE),
        "saturation": 1.0 + _uniform(g, -SATURATION_ALPHA, SATURATION_ALPHA),
        "lighting": (torch.randn(3, generator=g, dtype=torch.float64) * LIGHTING_STD).tolist(),
    }


STEPS = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "lighting": lighting}


def apply_colour(x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Apply the drawn steps in their order to one 3×H×W image of integer values 0..255."""
    y = x.to(torch.float64)
    for name in params["order"]:
        y = STEPS[name](y, params[name])
    return y


def fbresnet_colour(x_u8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One uint8 3×H×W RGB image -> float32 in [0, 1] after the random-order colour steps."""
    if x_u8.dtype != torch.uint8 or x_u8.dim() != 3 or x_u8.shape[0] != 3:
        raise ValueError(f"fbresnet colour steps need a uint8 3xHxW RGB image, got {tuple(x_u8.shape)} {x_u8.dtype}")
    return apply_colour(x_u8, colour_params(g)).to(torch.float32).div_(255.0)

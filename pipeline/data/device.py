"""The training-device half of the loader, as timm's PrefetchLoader: uint8 -> normalised float there.

    normalize = DeviceNormalizer(mean, std, device, erase_mode="pixel", pad_to_zero=False)
    images = normalize(uint8_images, labels, boxes, batch_seed)   # float32 [B, 3, S, S] on `device`

DataLoader workers hand over uint8 images (a quarter of float32's bytes between processes and to
the GPU); here they are moved to the device, normalised with (x - 255 mean) * 1 / (255 std) and erased
after normalisation in the boxes the workers drew with timm RandomErasing's parameters and random
calls (decode.EraseBoxes). The fill follows timm's modes: "const" zeros, "rand" one normal colour per
box, "pixel" normal noise per pixel; the noise comes from a generator seeded per batch, so a resumed
epoch erases with the same values and no global RNG (CPU or CUDA) is touched. Eval padding (label -1)
is zero after normalisation, as before the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def default_device() -> torch.device:
    """The training device of this process: its current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DeviceNormalizer:
    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        *,
        erase_mode: str = "const",
        pad_to_zero: bool = False,
    ):
        self.device = device
        self.shift = [255 * m for m in mean]
        self.scale = [1 / (255 * s) for s in std]
        self.erase_mode = erase_mode
        self.pad_to_zero = pad_to_zero

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, batch_seed: int
    ) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        for channel, (shift, scale) in enumerate(zip(self.shift, self.scale, strict=True)):
            # Scalar operands per channel: one vectorised pass each (a broadcast [1, C, 1, 1] operand
            # takes twice the CPU time); multiplying by 1 / std differs from dividing by < 1e-6.
            images[:, channel].sub_(shift).mul_(scale)
        if boxes.numel():
            images = self.erase(images, boxes, batch_seed)
        if self.pad_to_zero:
            pad = (labels < 0).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            images = images.masked_fill_(pad, 0.0)
        return images

    def erase(self, images: torch.Tensor, boxes: torch.Tensor, batch_seed: int) -> torch.Tensor:
        """Fill boxes [B, slots, 4] (top, left, height, width; height 0 = unused) in place.

        One fill per box, as timm's RandomErasing loops over images: noise only for the erased pixels
        (a whole-batch noise tensor costs more than the normalisation on a CPU device).
        """
        generator = torch.Generator(device=self.device).manual_seed(batch_seed)
        channels = images.shape[1]
        for index, (top, left, height, width) in _used_boxes(boxes):
            region = images[index, :, top : top + height, left : left + width]
            if self.erase_mode == "pixel":
                region.copy_(torch.randn((channels, height, width), generator=generator, device=self.device))
            elif self.erase_mode == "rand":
                region.copy_(torch.randn((channels, 1, 1), generator=generator, device=self.device).expand_as(region))
            else:
                region.zero_()
        return images


def _used_boxes(boxes: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(image index, box) of every box in use; boxes stay on the CPU, so no device sync."""
    return [(i, box) for i, image_boxes in enumerate(boxes.tolist()) for box in image_boxes if box[2]]

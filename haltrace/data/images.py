"""Open an item's image, whatever form it comes in (path, PIL image, uint8 array), with errors naming the file.

>>> import numpy as np
>>> open_image(np.zeros((4, 4, 3), dtype=np.uint8)).size
(4, 4)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from haltrace.errors import HaltraceError


class ImageError(HaltraceError):
    """An image cannot be opened: the message names the file and what to check."""


def open_image(image: Any) -> Any:
    """A PIL RGB image from a path, a PIL image or an ``HxWx3`` uint8 array (``None`` stays ``None``)."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image {path} not found; pass --images DIR (the folder the file names are "
                             "relative to) or use absolute paths")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"image {path} cannot be read ({exc}); is it a PNG/JPEG file?") from None
    try:
        import numpy as np

        arr = np.asarray(image)
    except Exception:  # noqa: BLE001 - any non-array object: say what was given
        arr = None
    if arr is None or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"cannot use a {type(image).__name__} as an image; pass a path, a PIL image or an "
                         "HxWx3 uint8 array")
    return Image.fromarray(arr.astype("uint8"), "RGB")


def open_images(images: Any) -> list[Any] | None:
    """:func:`open_image` over a sequence; ``None`` when every entry is ``None`` (text-only items)."""
    opened = [open_image(im) for im in images]
    return None if all(im is None for im in opened) else opened

"""Volume transforms (axis order, normalisation, resampling, shapes) and procedural phantoms."""
from .phantoms import ANATOMIES, DEFAULT_SPACING, MODALITY, make_phantom, make_phantom_array
from .transforms import (
    center_pad_or_crop,
    denormalize,
    image_to_network,
    network_to_image,
    network_to_image_like,
    normalize_percentile,
    pad_or_crop_to_multiple,
    random_crop,
    random_flip,
    resample_like,
    resample_to_spacing,
)

__all__ = [
    "ANATOMIES", "DEFAULT_SPACING", "MODALITY", "make_phantom", "make_phantom_array",
    "center_pad_or_crop", "denormalize", "image_to_network", "network_to_image", "network_to_image_like",
    "normalize_percentile", "pad_or_crop_to_multiple", "random_crop", "random_flip", "resample_like",
    "resample_to_spacing",
]

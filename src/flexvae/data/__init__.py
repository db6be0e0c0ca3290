"""Image input and output for training, inference and encoding.

``images.py`` finds and decodes image files (and writes PNGs), ``datasets.py`` turns a
folder or a torchvision dataset into items, ``batching.py`` stacks items into batches and
reports unreadable files once each.
"""

from .batching import Batch, SkipLog, collate, sample_images, sample_items, make_loader
from .datasets import TORCHVISION_DATASETS, ImageFolder, TorchvisionImages, open_dataset
from .images import (CHANNEL_MODES, IMAGE_EXTENSIONS, RESIZE_FILTERS, find_images, load_image, load_native,
                     pil_to_tensor,
                     save_grid, save_image)

__all__ = [
    "Batch", "SkipLog", "collate", "sample_images", "sample_items", "make_loader",
    "TORCHVISION_DATASETS", "ImageFolder", "TorchvisionImages", "open_dataset",
    "CHANNEL_MODES", "IMAGE_EXTENSIONS", "RESIZE_FILTERS", "find_images", "load_image", "load_native", "pil_to_tensor",
    "save_grid", "save_image",
]

"""The data room: datasets, and the way their batches reach the device.

- `datasets`: the datasets of a config (digits, synthetic, ImageFolder, timm's), the
  transforms and the resumable sampler.
- `image_folder`: ImageFolder trees read safely (class order, unreadable files, links).
- `timm_datasets`: timm's datasets and streams (webdataset shards, HF, TFDS, torchvision).
- `run_data`: `Data`, a run's datasets, samplers and loaders.
- `feed`: how a split's batches reach the device (`Feed`, `feed_for`, the loaders).
- `device_decode`: decoding image files on the device (`data.decode="gpu"`).
- `draws`: per-sample seeds, so augmentation is the same after a resume.

Imports: `vitblocks.train.errors`, `vitblocks.train.process`, `vitblocks.train.config`.
"""

from vitblocks.train.data.datasets import build_dataset, dataset_classes, sample_form, split_folder
from vitblocks.train.data.run_data import Data
from vitblocks.train.errors import DataError

__all__ = ["Data", "DataError", "build_dataset", "dataset_classes", "sample_form", "split_folder"]

"""Images (embedded shapes, ImageNet-style folders), the token cache, and what a training step reads."""
from d2c.data.batches import ImageSource, TokenSource, batch_indices
from d2c.data.cache import TokenCache, open_token_cache, sample_latents, token_cache_key
from d2c.data.cache_build import build_token_cache
from d2c.data.imagefolder import DataConfig, DataError, ImageFolder, build_dataset, center_crop_arr
from d2c.data.shapes import CLASSES, NUM_CLASSES, ShapesDataset, make_shapes

__all__ = ["ImageSource", "TokenSource", "batch_indices", "TokenCache", "build_token_cache", "open_token_cache", "sample_latents", "token_cache_key",
           "DataConfig", "DataError", "ImageFolder", "build_dataset", "center_crop_arr",
           "CLASSES", "NUM_CLASSES", "ShapesDataset", "make_shapes"]

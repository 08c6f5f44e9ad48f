"""Teacher signals captured once and reused: the sparse top-k cache (format, capture, reading for training)."""
from distill.signals.cache import CacheHeader, TopKCache, TopKCacheWriter, example_hash
from distill.signals.encoding import ENCODING_VERSION, Codec, TopKRows

__all__ = ["ENCODING_VERSION", "CacheHeader", "Codec", "TopKCache", "TopKCacheWriter", "TopKRows", "example_hash"]

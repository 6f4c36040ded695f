"""The seed's `core.cache` import path (compat/), with the cache classes once defined here (now `svd_cache`)."""

from .compat import LLaMAKVCache, StandardKVCache, SVDCacheLayer, SVDCompressedCache  # noqa: F401

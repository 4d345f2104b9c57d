"""Step caches: reuse work from earlier denoising steps instead of recomputing it (they approximate).

:class:`MagCacheConfig` describes MagCache; ``pipe.transformer.enable_cache(config)`` turns it on (see
:mod:`kandinsky5.sampling.caches.magcache`); :func:`calibrate` measures a model's ratios (see
:mod:`kandinsky5.sampling.caches.calibration`).
"""

from kandinsky5.sampling.caches.calibration import MagnitudeRecorder, calibrate, load_ratios, save_ratios
from kandinsky5.sampling.caches.magcache import (
    MagCache,
    MagCacheConfig,
    magcache_config_for,
    official_ratios,
    official_ratios_key,
)


def make_cache(config) -> MagCache:
    """The stage wrapper a cache configuration describes."""
    if isinstance(config, MagCacheConfig):
        return MagCache(config)
    raise TypeError(f"unknown cache configuration {type(config).__name__}; expected MagCacheConfig")


__all__ = [
    "MagCache",
    "MagCacheConfig",
    "MagnitudeRecorder",
    "calibrate",
    "load_ratios",
    "magcache_config_for",
    "make_cache",
    "official_ratios",
    "official_ratios_key",
    "save_ratios",
]

"""Analyses of a quantized model against its float original: metrics and :func:`evaluate`
(:mod:`.metrics`, :mod:`.outputs`), calibration coverage (:mod:`.range_coverage`), per-layer
sensitivity (:mod:`.sensitivity`) and the float fallback built on it (:mod:`.fallback`).

The public function is :func:`ptqkit.evaluate` (this package is named apart from it, so that
importing a submodule never rebinds that name)."""

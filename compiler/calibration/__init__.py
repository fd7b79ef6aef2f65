"""Calibration: sources of tokens (`sources`), the layer-by-layer decoder driver (`layerwise`),
input statistics (`stats`) and perplexity on the held-out split (`evaluation`)."""

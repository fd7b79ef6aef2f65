"""Pipelines: the pass infrastructure and registry (`passes`), recipes (`recipes`), instruments (`instruments`)."""

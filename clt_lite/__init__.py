"""clt-lite: cross-layer transcoders and circuit tracing on LLaVA."""

__version__ = "0.1.0"

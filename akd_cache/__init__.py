"""akd-cache: distil code LLMs from an offline, content-addressed teacher cache."""

__version__ = "0.1.0"

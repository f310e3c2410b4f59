"""embedd: a local text-embedding daemon serving GGUF models over a Unix socket."""

__version__ = "0.1.0"

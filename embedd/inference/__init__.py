"""Everything that touches a model: llama.cpp's C API, the model thread that owns each
context, which inputs go into the next batch, admission, compute threads, the vector cache and
the lifecycle of loaded models."""

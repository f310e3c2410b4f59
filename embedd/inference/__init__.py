"""Everything that touches a model: llama.cpp's C API, a model's coordinating thread and the
replica threads that each own a context, which inputs go into the next batch, admission, the
core budget and compute threads, the vector cache and the lifecycle of loaded models."""

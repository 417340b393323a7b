"""
Generated pretraining text, by the --data name that selects it: document(i, split) for
nanochat.dataset.get_source(..., generated=GENERATED). Each document is a pure function of its
index, so a run resumes exactly and torchrun ranks read disjoint documents.

- "embedded": the knowledge world's articles followed by questions answered from them
  (tasks.knowledge_world.pretraining_documents), never repeating, license-clean.
- "reading": reading drills as plain text (tasks.reading.pretraining_text).
- "recall": key -> value recall drills (tasks.recall.recall_document), e.g. embedded:1+recall:1.
"""
from tasks.knowledge_world import pretraining_documents
from tasks.reading import pretraining_text
from tasks.recall import recall_document

VAL_OFFSET = 1_000_000_007   # validation worlds come from a disjoint seed range


def world_document(i, split):
    # each index seeds its own little world
    return next(iter(pretraining_documents((VAL_OFFSET if split == "val" else 0) + i)))


GENERATED = {"embedded": world_document, "reading": pretraining_text, "recall": recall_document}

"""
A KB's tuned query encoder: the query side of `dense` (and so of `hybrid`), fine-tuned by
`scripts/retriever_train.py` while the documents keep the base model's embeddings. Only queries
are re-encoded, so the FAISS index and embeddings.npy are never touched (RAG, Atlas and RA-DIT
tune the query side the same way).

On disk, inside the KB:
    query_encoder-<stamp>/  a sentence-transformers model directory: model.safetensors, config and
                            tokenizer JSON files, metrics.jsonl of the training run (no pickle)
    manifest.json           "query_encoder": its directory, objective, base model, steps, data,
                            held-out metrics; its files are in "checksums" like the rest of the KB
The new encoder is written beside the old one and the manifest is replaced in one rename, the
commit point: a run killed at any moment leaves the KB with its previous encoder (or none).
"""
import os
import re
import json
import time
import shutil

from nanochat.retrieval.manifest import read_manifest, sha256_file

ENCODER_PREFIX = "query_encoder-"


def encoder_path(kb_dir, manifest):
    """The KB's tuned query encoder directory, or None."""
    info = manifest.get("query_encoder")
    return os.path.join(kb_dir, info["dir"]) if info else None


def load_encoder(path, device=None):
    """A sentence-transformers model from a local directory, never from the network, and not
    cached: a retrained encoder must be re-read."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device=device)


def save_beside_checkpoint(model, ckpt_dir):
    """A query encoder trained with a generator (chat_sft / base_train --marginalize), saved as
    ckpt_dir/query_encoder (sentence-transformers' safetensors), replacing the previous one by rename."""
    final, tmp = os.path.join(ckpt_dir, "query_encoder"), os.path.join(ckpt_dir, ".query_encoder.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def save_encoder(kb_dir, model, info, metrics_rows=()):
    """Write `model` into the KB as its query encoder, `info` under manifest["query_encoder"].
    Returns the encoder's directory."""
    manifest = read_manifest(kb_dir)
    if "dense" not in manifest.get("retrievers", []):
        raise ValueError(f"{kb_dir}: the KB has no dense index; a query encoder needs one")
    previous = (manifest.get("query_encoder") or {}).get("dir")
    for entry in os.listdir(kb_dir):   # leftovers of killed runs: never referenced by the manifest
        if re.fullmatch(r"\.?query_encoder-.*", entry) and entry != previous:
            shutil.rmtree(os.path.join(kb_dir, entry), ignore_errors=True)
    stamp = f"{ENCODER_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    name, n = stamp, 1
    while name == previous or os.path.exists(os.path.join(kb_dir, name)):   # two saves within a second
        name, n = f"{stamp}-{n}", n + 1
    tmp, final = os.path.join(kb_dir, "." + name), os.path.join(kb_dir, name)
    tmp_manifest = os.path.join(kb_dir, f".manifest.json.tmp-{os.getpid()}")
    renamed = committed = False
    try:
        model.save(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "metrics.jsonl"), "w", encoding="utf-8") as f:
            for row in metrics_rows:
                f.write(json.dumps(row) + "\n")
        for root, _, names in os.walk(tmp):
            for n in names:
                if n.endswith((".bin", ".pt", ".pkl", ".pickle")):
                    raise ValueError(f"{os.path.join(root, n)}: the encoder was saved with pickle; refusing to keep it")
        os.rename(tmp, final)
        renamed = True
        checksums = {f: h for f, h in manifest["checksums"].items() if not (previous and f.startswith(previous + "/"))}
        for root, dirs, names in os.walk(final):
            dirs.sort()
            for n in sorted(names):
                rel = os.path.relpath(os.path.join(root, n), kb_dir)
                checksums[rel] = sha256_file(os.path.join(root, n))
        manifest["checksums"] = checksums
        manifest["query_encoder"] = dict(info, dir=name, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp_manifest, os.path.join(kb_dir, "manifest.json"))   # the commit
        committed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp_manifest):
            os.remove(tmp_manifest)
        if renamed and not committed:
            shutil.rmtree(final, ignore_errors=True)
    if previous:
        shutil.rmtree(os.path.join(kb_dir, previous), ignore_errors=True)
    return final

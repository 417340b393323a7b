"""
A knowledge base's manifest (manifest.json: format version, build settings, file checksums) and
the checksum it records: the lowest layer of a KB, read by kb.py and query_encoder.py alike.
"""
import os
import json
import hashlib

FORMAT_VERSION = 1


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _interrupted_hint(kb_dir):
    parent, name = os.path.split(os.path.abspath(kb_dir))
    olds = [n for n in os.listdir(parent) if n.startswith(f".{name}.old-")] if os.path.isdir(parent) else []
    return f" ({os.path.join(parent, olds[0])} is the KB from an interrupted build: rename it back)" if olds else ""


def read_manifest(kb_dir):
    if not os.path.isdir(kb_dir):
        raise FileNotFoundError(f"{kb_dir}: knowledge base directory not found{_interrupted_hint(kb_dir)}; "
                                f"build one with `python -m kb_tools.build_kb`")
    path = os.path.join(kb_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {kb_dir} is not a knowledge base built by kb_tools.build_kb")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: unreadable manifest (no format_version); rebuild the KB") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: KB format version {version} is newer than this code reads ({FORMAT_VERSION}); "
                         f"update nanochat-rag or rebuild the KB")
    return manifest

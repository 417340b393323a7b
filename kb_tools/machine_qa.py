"""
Real knowledge bases and question sets built from text already on this machine, for testing
whether a model reads documents it has never seen (zero-shot transfer). Nothing is downloaded and
nothing here is ever used for training: nanochat.dataset's real-text corpus skips these sources.

Each source becomes DIR/<name>_kb.jsonl ({"id", "title", "text"}, for kb_tools.build_kb) and
DIR/<name>_qa.jsonl ({"question", "answers", "supporting_ids", "type"}, for chat_eval --qa):

    httpstatus   Python's http.HTTPStatus: code, reason phrase, description        (every machine)
    errno        Python's errno table and os.strerror: name, number, message      (every machine)
    countries    /usr/share/iso-codes/json/iso_3166-1.json (Debian's iso-codes)   (if installed)
    currencies   /usr/share/iso-codes/json/iso_4217.json                          (if installed)
    services     /etc/services: service name, port, protocol, comment            (if present)
    manpages     /usr/share/man/man1: a command's NAME line and first description  (if installed)

The documents keep each source's own wording and layout; the questions are written per source
(not by the reading-drill generator), with the answer a span of the gold document.

    python -m kb_tools.machine_qa --out data/machine [--sources httpstatus,errno] [--max-questions 500]
"""
import os
import re
import gzip
import json
import random
import argparse

ISO_DIR = "/usr/share/iso-codes/json"
SERVICES = "/etc/services"
MAN1 = "/usr/share/man/man1"


def qa(question, answer, doc_id, kind, more=()):
    return {"question": question, "answers": [answer, *more], "supporting_ids": [doc_id], "type": kind}


def httpstatus():
    from http import HTTPStatus
    docs, qs = [], []
    for s in HTTPStatus:
        doc_id = f"http-{s.value}"
        text = f"{s.value} {s.phrase}\n{s.description}." if s.description else f"{s.value} {s.phrase}"
        docs.append({"id": doc_id, "title": f"HTTP {s.value}", "text": text})
        qs.append(qa(f"What is the reason phrase of HTTP status code {s.value}?", s.phrase, doc_id, "phrase"))
        qs.append(qa(f"Which HTTP status code has the reason phrase {s.phrase}?", str(s.value), doc_id, "code"))
    return docs, qs


def errno_table():
    import errno
    docs, qs = [], []
    for number, name in sorted(errno.errorcode.items()):
        message = os.strerror(number)
        if message.startswith("Unknown error"):
            continue
        doc_id = f"errno-{name}"
        docs.append({"id": doc_id, "title": name, "text": f"{name} (errno {number}): {message}"})
        qs.append(qa(f"What is the errno number of {name}?", str(number), doc_id, "number"))
        qs.append(qa(f"What is the error message for {name}?", message, doc_id, "message"))
    # aliases (EWOULDBLOCK = EAGAIN) share a number: errorcode keeps one name per number, so ids are unique
    return docs, qs


def _iso(filename, key):
    path = os.path.join(ISO_DIR, filename)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)[key]


def countries():
    rows = _iso("iso_3166-1.json", "3166-1")
    if rows is None:
        return None
    docs, qs = [], []
    for r in rows:
        doc_id = f"country-{r['alpha_2']}"
        lines = [f"{k}: {r[k]}" for k in ("name", "official_name", "common_name", "alpha_2", "alpha_3", "numeric") if k in r]
        docs.append({"id": doc_id, "title": r["name"], "text": "\n".join(lines)})
        name = r["name"]
        qs.append(qa(f"What is the alpha-3 code of {name}?", r["alpha_3"], doc_id, "alpha_3"))
        qs.append(qa(f"What is the two-letter country code of {name}?", r["alpha_2"], doc_id, "alpha_2"))
        qs.append(qa(f"What is the numeric code of {name}?", r["numeric"], doc_id, "numeric"))
        if "official_name" in r:
            qs.append(qa(f"What is the official name of {name}?", r["official_name"], doc_id, "official_name"))
    return docs, qs


def currencies():
    rows = _iso("iso_4217.json", "4217")
    if rows is None:
        return None
    docs, qs = [], []
    for r in rows:
        doc_id = f"currency-{r['alpha_3']}"
        docs.append({"id": doc_id, "title": r["name"], "text": "\n".join(f"{k}: {r[k]}" for k in ("name", "alpha_3", "numeric") if k in r)})
        qs.append(qa(f"What is the ISO 4217 code of the {r['name']}?", r["alpha_3"], doc_id, "alpha_3"))
        if "numeric" in r:
            qs.append(qa(f"What is the numeric code of the currency {r['name']}?", r["numeric"], doc_id, "numeric"))
    return docs, qs


def services():
    if not os.path.exists(SERVICES):
        return None
    by_name = {}
    with open(SERVICES, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^([A-Za-z][\w.+-]*)\s+(\d+)/(tcp|udp|sctp|ddp)\b(.*)$", line.rstrip("\n"))
            if m:
                by_name.setdefault(m.group(1), []).append((m.group(2), m.group(3), line.strip()))
    docs, qs = [], []
    for name, entries in by_name.items():
        doc_id = f"service-{name}"
        docs.append({"id": doc_id, "title": name, "text": "\n".join(e[2] for e in entries)})
        port = entries[0][0]
        # "464/udp" answers "which port does kpasswd use" as well as "464/tcp" does
        qs.append(qa(f"Which port does the {name} service use?", port, doc_id, "port",
                     [f"{p}/{proto}" for p, proto, _ in entries if p == port]))
    return docs, qs


def _troff_text(line):
    """A troff source line as plain text: escapes and font changes dropped."""
    line = re.sub(r"\\s[-+]?\d|\\f[BIRP]|\\f\(..|\\\*\(..|\\\*.|\\\(..", "", line)
    line = line.replace("\\-", "-").replace("\\ ", " ").replace("\\&", "").replace("\\e", "\\")
    line = re.sub(r"\\.", "", line)
    return line.strip()


def manpages(limit=400):
    if not os.path.isdir(MAN1):
        return None
    docs, qs = [], []
    files = sorted(os.listdir(MAN1))
    for filename in random.Random("manpages").sample(files, len(files)):   # spread over the alphabet
        if len(docs) >= limit:
            break
        path = os.path.join(MAN1, filename)
        try:
            opener = gzip.open if filename.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="strict") as f:
                source = f.read(200_000)
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        sections, current = {}, None
        for line in source.splitlines():
            m = re.match(r'^\.SH\s+"?([^"]+)"?', line)
            if m:
                current = m.group(1).strip().upper()
                sections[current] = []
            elif current and not line.startswith(('.\\"', "'\\\"")):
                if line.startswith("."):
                    macro = line.split(None, 1)
                    if macro[0] in (".B", ".I", ".BR", ".IR", ".RB", ".BI") and len(macro) > 1:
                        sections[current].append(_troff_text(macro[1].replace('"', "")))
                    elif macro[0] in (".PP", ".P", ".LP", ".TP", ".IP", ".sp"):
                        sections[current].append("")
                    continue
                sections[current].append(_troff_text(line))
        name_line = " ".join(t for t in sections.get("NAME", []) if t)
        m = re.match(r"^([\w.+-]+)(?:\s*,\s*[\w.+-]+)*\s+-+\s+(.+)$", name_line)
        if not m or len(m.group(2).split()) > 12:
            continue
        command, summary = m.group(1), m.group(2).strip().rstrip(".")
        description = " ".join(t for t in sections.get("DESCRIPTION", []) if t)[:600]
        doc_id = f"man-{command}"
        if any(d["id"] == doc_id for d in docs):
            continue
        docs.append({"id": doc_id, "title": f"{command}(1)", "text": f"NAME\n{name_line}\n\nDESCRIPTION\n{description}".strip()})
        qs.append(qa(f"What does the {command} command do?", summary, doc_id, "summary"))
    return (docs, qs) if docs else None


SOURCES = {"httpstatus": httpstatus, "errno": errno_table, "countries": countries, "currencies": currencies,
           "services": services, "manpages": manpages}


def build(out_dir, names, max_questions=500, seed=0):
    """Write the sets that this machine can make; returns {name: (num_docs, num_questions)}."""
    os.makedirs(out_dir, exist_ok=True)
    made = {}
    for name in names:
        result = SOURCES[name]()
        if result is None:
            continue
        docs, qs = result
        rng = random.Random(f"{name}-{seed}")
        if len(qs) > max_questions:
            qs = rng.sample(qs, max_questions)
        for suffix, rows in (("kb", docs), ("qa", qs)):
            path = os.path.join(out_dir, f"{name}_{suffix}.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(path + ".tmp", path)
        made[name] = (len(docs), len(qs))
    return made


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build real KBs and question sets from text on this machine (zero-shot reading tests)")
    parser.add_argument("--out", required=True, help="output directory for <name>_kb.jsonl and <name>_qa.jsonl")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of: {', '.join(SOURCES)} (missing ones are skipped)")
    parser.add_argument("--max-questions", type=int, default=500, help="questions per source at most (a seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        parser.error(f"--sources: unknown {', '.join(unknown)} (choose from {', '.join(SOURCES)})")
    if args.max_questions <= 0:
        parser.error("--max-questions must be positive")
    made = build(args.out, names, args.max_questions, args.seed)
    for name in names:
        if name in made:
            print(f"{name}: {made[name][0]} documents, {made[name][1]} questions -> {args.out}/{name}_{{kb,qa}}.jsonl")
        else:
            print(f"{name}: not available on this machine, skipped")

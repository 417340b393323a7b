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
    dpkg         /var/lib/dpkg/status: installed Debian packages, every field and the description
                 prose (Version, Installed-Size, Section, Maintainer, ...)           (Debian machines)
    pymeta       METADATA of the installed Python distributions: Name, Version, Summary, License,
                 Requires-Python, ... and the start of the long description          (every machine)

dpkg and pymeta are multi-field entries of 100-500 tokens where several values are of one kind
(a version, a size and versions inside Depends; a version and Requires-Python) and many entries
have the same shape, so only reading the entry the question names, under the key it asks for,
answers them. They are development sets: not among the six sets the speedrun reports.

The documents keep each source's own wording and layout; the questions are written per source
(not by the reading-drill generator), with the answer a span of the gold document.

    python -m kb_tools.machine_qa --out data/machine [--sources httpstatus,errno] [--max-questions 500]
    python -m kb_tools.machine_qa --out data/machine --sources dpkg,pymeta       # the multi-field sets
"""
import os
import re
import gzip
import json
import random
import argparse

ISO_DIR = "/usr/share/iso-codes/json"
DPKG_STATUS = "/var/lib/dpkg/status"
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


def _pick(rng, templates, **values):
    """One wording of a question, seeded: the key is asked in more ways than the entry spells it."""
    return rng.choice(templates).format(**values)


DPKG_QUESTIONS = {
    "Version": ["What is the version of the {name} package?", "Which version of {name} is installed?",
                "What version is the installed {name} package?"],
    "Installed-Size": ["What is the installed size of {name}?", "How much disk space does the {name} package take once installed?",
                       "What is the size of the installed {name} package?"],
    "Section": ["In which section is the {name} package?", "Which archive section does {name} belong to?"],
    "Source": ["What is the source package of {name}?", "Which source package is {name} built from?"],
    "Maintainer": ["Who maintains the {name} package?", "Who is the maintainer of {name}?"],
    "Homepage": ["What is the homepage of {name}?", "Where is the home page of the {name} package?"],
    "Description": ["What is the short description of {name}?", "How does the {name} package describe itself in one line?"],
}


def dpkg(limit=400):
    """Installed Debian packages from the dpkg database: one entry per package, its fields as dpkg
    writes them (Status, Multi-Arch and Conffiles dropped: bookkeeping, not facts about the package)."""
    if not os.path.exists(DPKG_STATUS):
        return None
    with open(DPKG_STATUS, encoding="utf-8", errors="replace") as f:
        stanzas = [s for s in f.read().split("\n\n") if s.strip()]
    rng = random.Random("dpkg")
    docs, qs = [], []
    for stanza in rng.sample(stanzas, len(stanzas)):
        if len(docs) >= limit:
            break
        fields, lines, key = {}, [], None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                if key not in ("Conffiles",):
                    lines.append(line)
                continue
            key, _, value = line.partition(":")
            if key in ("Status", "Multi-Arch", "Conffiles"):
                continue
            fields[key] = value.strip()
            lines.append(line)
        name = fields.get("Package")
        if not name or "Version" not in fields or "install ok installed" not in stanza:
            continue
        doc_id = f"dpkg-{name}"
        docs.append({"id": doc_id, "title": name, "text": "\n".join(lines)})
        for key, templates in DPKG_QUESTIONS.items():
            value = fields.get(key, "")
            if not value:
                continue
            answer, more = value, ()
            if key == "Maintainer":
                answer, more = re.sub(r"\s*<[^>]*>", "", value).strip(), (value,)   # the name; the address is not asked
            if key == "Installed-Size":
                more = (f"{value} KiB", f"{value} kB")
            if len(answer.split()) > 12 or answer not in docs[-1]["text"]:
                continue
            qs.append(qa(_pick(rng, templates, name=name), answer, doc_id, key.lower(), more))
    return (docs, qs) if docs else None


PYMETA_QUESTIONS = {
    "Version": ["What is the version of the Python package {name}?", "Which version of {name} is installed?"],
    "Summary": ["What is the summary of the Python package {name}?", "How does {name} describe itself in one line?"],
    "License": ["Under which license is {name} distributed?", "What is the license of the Python package {name}?"],
    "Requires-Python": ["Which Python versions does {name} require?", "What is the Requires-Python of {name}?"],
    "Author": ["Who is the author of the Python package {name}?", "Who wrote {name}?"],
    "Home-page": ["What is the home page of the Python package {name}?"],
}
PYMETA_LIST_KEYS = ("Classifier", "Requires-Dist", "Project-URL", "Provides-Extra", "License-File")


def _site_dirs():
    import site
    import sysconfig
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(), "/usr/lib/python3/dist-packages"]
    return [d for k, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:k]]


def pymeta(limit=400, description_chars=300):
    """Installed Python distributions' METADATA (core metadata, RFC 822 style): the header fields
    (lists such as Classifier and Requires-Dist kept to their first 3 lines, licence texts
    longer than a line dropped), then the start of the long description."""
    from email.parser import Parser
    paths = sorted({os.path.join(d, n, "METADATA") for d in _site_dirs() for n in os.listdir(d) if n.endswith(".dist-info")})
    rng = random.Random("pymeta")
    docs, qs, seen = [], [], set()
    for path in rng.sample(paths, len(paths)):
        if len(docs) >= limit:
            break
        try:
            with open(path, encoding="utf-8") as f:
                msg = Parser().parse(f)
        except (OSError, UnicodeDecodeError):
            continue
        name = msg.get("Name")
        if not name or "Version" not in msg or name.lower() in seen:
            continue
        seen.add(name.lower())
        lines, counts, fields = [], {}, {}
        for key, value in msg.items():
            value = " ".join(str(value).split())
            if not value or len(value) > 200:
                continue
            counts[key] = counts.get(key, 0) + 1
            if key in PYMETA_LIST_KEYS and counts[key] > 3:
                continue
            fields.setdefault(key, value)
            lines.append(f"{key}: {value}")
        body = (msg.get_payload() or msg.get("Description") or "").strip()
        body = body[:description_chars].rsplit("\n", 1)[0] if len(body) > description_chars else body
        doc_id = f"pymeta-{name.lower()}"
        docs.append({"id": doc_id, "title": name, "text": "\n".join(lines) + ("\n\n" + body if body else "")})
        if "Author" not in fields and "Author-email" in fields:   # "Name <address>", as modern metadata writes it
            author = re.sub(r"\s*<[^>]*>", "", fields["Author-email"]).strip(" ,")
            if author and "@" not in author:
                fields["Author"] = author
        for key, templates in PYMETA_QUESTIONS.items():
            value = fields.get(key, "")
            if not value or value.upper() == "UNKNOWN" or len(value.split()) > 12 or value not in docs[-1]["text"]:
                continue   # (an author taken from several "Name <address>" is no span of the entry)
            qs.append(qa(_pick(rng, templates, name=name), value, doc_id, key.lower()))
    return (docs, qs) if docs else None


SOURCES = {"httpstatus": httpstatus, "errno": errno_table, "countries": countries, "currencies": currencies,
           "services": services, "manpages": manpages, "dpkg": dpkg, "pymeta": pymeta}
DEFAULT_SOURCES = ("httpstatus", "errno", "countries", "currencies", "services", "manpages")   # the speedrun's six


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
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help=f"comma list of: {', '.join(SOURCES)} (default the six the speedrun reports; missing ones are skipped)")
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

"""
Reading drills: a fresh little knowledge base per example, in many document shapes, and a
question whose answer is a span of one of its documents.

The knowledge world teaches a tiny model to read four article templates about invented people;
that skill stays inside the world (0.5% EM on a real reference KB). What carries over is reading
in general, so this generator varies everything a real KB varies:

- shapes: `Key: value` records, prose, infobox rows, glossary pages, tables, bulleted lists,
  manual-page sections (NAME / OPTIONS), long entries (a headword, 5-10 fields several of which
  hold one kind of value, then real prose: package records, dictionary entries), and cloze
  questions over real paragraphs;
- schemas: field names drawn from real English words (the docstrings of the installed Python
  packages, see nanochat.dataset.RealTextSource), value types names, numbers with units,
  years, dates, codes and multi-word phrases;
- questions: many wordings per field, some naming only the field's last word, some adding a head
  noun ("numeric code" for a `numeric` key), some lower-cased, some the other way round (which
  table row has this value?); keys spelled as words or joined as identifiers (`alpha_3`, `alpha-3`);
- distractors: other documents of the same shape and schema, so the entity has to be matched.

Words, names and one shape (`infobox`) are split by a hash into training and held-out: the
held-out split measures transfer to schemas and a layout never trained on.

    python -m tasks.reading --show 5 [--level 1|2|3] [--split heldout]
"""
import re
import zlib
import random
import argparse
from functools import lru_cache

from tasks.common import Task
from nanochat.rag import answer_text, exact_match, qa_reward

HELDOUT_BUCKETS = 8          # one word (and name) in 8 is held out
HELDOUT_SHAPES = ("infobox",)
FIELD_SHAPES = ("record", "inline", "prose", "infobox", "table")   # entity x field schemas
SHAPES = FIELD_SHAPES + ("entry", "unkeyed", "glossary", "list", "manual", "cloze")
STOPWORDS = set("""the and for with that this from are was were been being have has had not but can will would
should could may might must shall into onto over under than then them they their there these those which what
when where while who whom whose why how all any each every some such only also more most other another same very
just its it's our your his her him she you use used uses using one two three none true false self cls args kwargs
return returns none see note example default""".split())
UNITS = ["km", "kg", "m", "cm", "mm", "g", "s", "ms", "hours", "days", "years", "people", "%", "MB", "GB", "Hz", "MHz",
         "kW", "V", "bytes", "pages", "seats", "tons", "miles", "degrees", "points"]
MONTHS = "January February March April May June July August September October November December".split()


def is_heldout(word):
    return zlib.crc32(word.lower().encode()) % HELDOUT_BUCKETS == 0


# -----------------------------------------------------------------------------
# Vocabulary and real paragraphs, from the real-text corpus on this machine

@lru_cache(maxsize=1)
def real_corpus(max_docs=4000):
    """Paragraphs of real English (docstrings of installed packages): the word list and the
    cloze drills come from these. Falls back to nothing if the corpus is unavailable."""
    from nanochat.dataset import RealTextSource
    source = RealTextSource("train")
    n = min(len(source), max_docs)
    step = max(1, len(source) // n)
    return [source.get(i * step) for i in range(n)]


@lru_cache(maxsize=1)
def english_words():
    """(train words, held-out words): lower-case alphabetic words that occur at least 3 times in
    the real corpus, minus the commonest function words."""
    counts = {}
    for text in real_corpus():
        for w in re.findall(r"\b[a-z]{3,12}\b", text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= 3 and w not in STOPWORDS), key=lambda w: (-counts[w], w))
    if len(words) < 200:
        raise RuntimeError("the real-text corpus gave fewer than 200 words: reading drills need real English "
                           "(python -m nanochat.dataset --help says where it reads from)")
    return [w for w in words if not is_heldout(w)], [w for w in words if is_heldout(w)]


# -----------------------------------------------------------------------------
# Values: every answer is one of these, and is written into its document verbatim

class Vocab:
    """Words of one split, and random values built from them."""

    def __init__(self, words, rng):
        self.words, self.rng = words, rng

    def word(self):
        return self.rng.choice(self.words)

    def phrase(self, lo=2, hi=4):
        return " ".join(self.word() for _ in range(self.rng.randint(lo, hi)))

    def field(self):
        return self.phrase(1, 2)

    def name(self):
        r = self.rng
        kind = r.random()
        if kind < 0.4:
            return self.word().capitalize()
        if kind < 0.7:
            return f"{self.word().capitalize()} {self.word().capitalize()}"
        # an invented name from two word halves ("Tensoray"): real-looking, never a real word
        a, b = self.word(), self.word()
        return (a[:max(2, len(a) // 2)] + b[len(b) // 2:]).capitalize()

    def value(self, kind):
        r = self.rng
        if kind == "name":
            return self.name()
        if kind == "word":
            return self.word()
        if kind == "phrase":
            return self.phrase()
        if kind == "number":
            n = r.choice([r.randint(2, 99), r.randint(100, 9999), r.randint(10000, 999999)])
            text = f"{n:,}" if n >= 10000 and r.random() < 0.5 else str(n)
            if r.random() < 0.2:
                text = f"{n / 10:.1f}"
            return f"{text} {r.choice(UNITS)}" if r.random() < 0.6 else text
        if kind == "year":
            return str(r.randint(1500, 2030))
        if kind == "date":
            y, m, d = r.randint(1700, 2030), r.randint(1, 12), r.randint(1, 28)
            return r.choice([f"{d} {MONTHS[m - 1]} {y}", f"{MONTHS[m - 1]} {d}, {y}", f"{y}-{m:02d}-{d:02d}"])
        if kind == "code":
            letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
            style = r.randrange(5)
            if style == 0:
                return "".join(r.choice(letters) for _ in range(r.randint(2, 4)))
            if style == 1:
                return r.choice(letters) + str(r.randint(10, 9999))
            if style == 2:
                return "".join(r.choice(letters) for _ in range(2)) + "-" + str(r.randint(1, 999))
            if style == 3:
                return f"{r.randint(1, 65535)}/{r.choice(['tcp', 'udp'])}"
            return f"{r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}"
        if kind == "version":
            major = r.randint(0, 20)
            parts = ".".join([str(major)] + [str(r.randint(0, 20)) for _ in range(r.randint(1, 2))])
            # one version, or a requirement on versions as dependency fields write them
            return r.choice([parts, parts, f"{parts}-{r.randint(1, 9)}", f"{r.randint(1, 3)}:{parts}-{r.randint(1, 9)}", f"v{parts}",
                             f">={parts}", f">= {parts}", f"~={parts}", f">={parts},<{major + 1}", f"({r.choice(['>=', '<<', '='])} {parts})"])
        if kind == "url":
            w, tld = self.word, r.choice(['org', 'net', 'io', 'com'])
            return r.choice([f"https://{w()}.{tld}/{w()}", f"https://www.{w()}.{tld}", f"http://{w()}.{w()}.{tld}/{w()}/",
                             f"https://{r.choice(['github.com', 'gitlab.com', 'codeberg.org'])}/{w()}/{w()}-{w()}",
                             f"https://{w()}.{tld}/{w()}/{w()}.html"])
        if kind == "person":
            return self.person()[0]
        raise ValueError(kind)

    def person(self):
        """(name, how an entry writes it): "Ada Stone", maybe with an address ("Ada Stone <stone@loop.org>")."""
        name = f"{self.word().capitalize()} {self.word().capitalize()}"
        if self.rng.random() < 0.5:
            return name, name
        return name, f"{name} <{self.word()}@{self.word()}.{self.rng.choice(['org', 'net', 'com'])}>"

    def identifier(self):
        """A name as software and reference entries spell them: lower case, joined ("libstone2", "river-engine")."""
        r, a, b = self.rng, self.word(), self.word()
        return r.choice([f"lib{a}{r.randint(0, 9)}", f"{a}-{b}", f"{a}{r.randint(1, 9)}-{b}", f"{a}_{b}", f"python3-{a}",
                         f"{a}.{b}", f"{a}-{b}-{self.word()}"])


VALUE_KINDS = ["name", "word", "phrase", "number", "year", "date", "code"]

QUESTIONS = ["What is the {f} of {e}?", "What is {e}'s {f}?", "What {f} does {e} have?", "Which {f} is given for {e}?",
             "Give the {f} of {e}.", "Tell me the {f} of {e}.", "{e}: what is the {f}?", "What is listed as the {f} of {e}?",
             "Find the {f} of {e}.", "What's the {f} for {e}?", "According to the document, what is the {f} of {e}?",
             "What does the entry for {e} give as its {f}?", "{f} of {e}?", "I need the {f} of {e}.",
             "Look up the {f} of {e}.", "Can you tell me what the {f} of {e} is?"]


HEAD_NOUNS = ["code", "number", "value", "name", "entry", "field"]


def field_question(rng, entity, field, noun=None, shorten=True):
    """A question about one field of an entity; with noun, sometimes "the <noun> <entity>" (real
    questions name the kind of thing: "the currency Iceland Krona"). shorten: a two-word field is
    sometimes asked by its last word."""
    if noun and rng.random() < 0.15:
        entity = f"the {noun} {entity}"
    f = field
    if shorten and " " in f and rng.random() < 0.25:
        f = f.split()[-1]                      # a shorter name for the field
    elif " " not in f and rng.random() < 0.15:
        f = f"{f} {rng.choice(HEAD_NOUNS)}"    # a wordier one: real keys are terse ("numeric" asked as "numeric code")
    q = rng.choice(QUESTIONS).format(f=f, e=entity)
    if rng.random() < 0.1:
        q = q[0].lower() + q[1:]
    return q[0].upper() + q[1:] if rng.random() < 0.9 else q


# -----------------------------------------------------------------------------
# Shapes. Each returns (documents, question, answer) with the answer a span of the gold document.

def _schema(v, rng):
    fields, seen, n = [], set(), rng.randint(3, 7)
    while len(fields) < n:
        f = v.field()
        if f not in seen:
            seen.add(f)
            fields.append((f, rng.choice(VALUE_KINDS)))
    return fields


def _entities(v, rng, n, related=False):
    """n distinct names; related: they share a word ("Iceland Krona", "Swedish Krona"), as the
    near misses a retriever brings next to the right entry do."""
    names, seen = [], set()
    shared, shared_first = v.word().capitalize(), rng.random() < 0.5
    while len(names) < n:
        name = v.name()
        if related:
            other = v.word().capitalize()
            name = f"{shared} {other}" if shared_first else f"{other} {shared}"
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def _fill(v, names, schema):
    return [{f: v.value(kind) for f, kind in schema} for _ in names]


def _key(rng, field):
    """How a document spells a field the question names in plain words: as is, capitalised, title
    case, or joined as identifiers are (snake_case, kebab-case, camelCase)."""
    style = rng.randrange(6) if " " in field else rng.randrange(3)
    if style == 3:
        return field.replace(" ", "_")
    if style == 4:
        return field.replace(" ", "-")
    if style == 5:
        first, *rest = field.split()
        return first + "".join(w.capitalize() for w in rest)
    return field if style == 0 else (field.capitalize() if style == 1 else field.title())


def render_record(rng, name, values, shape):
    items = list(values.items())
    rng.shuffle(items)
    if shape == "record":
        sep = rng.choice([": ", ": ", " - ", " = "])
        return "\n".join(f"{_key(rng, f)}{sep}{val}" for f, val in items)
    if shape == "infobox":
        return f"| {name} |\n" + "\n".join(f"| {_key(rng, f)} | {val} |" for f, val in items)
    if shape == "inline":
        # one line, values ended by a delimiter rather than the line's end ("EPERM (errno 1): ...",
        # "a=1, b=2", tab-separated columns): the answer stops at the punctuation
        sep, kv = rng.choice([", ", "; ", " | ", "\t", ". "]), rng.choice([": ", "=", " ", " - "])
        fields = [f"{_key(rng, f)}{kv}{val}" for f, val in items]
        if rng.random() < 0.3:
            return f"{name} ({fields[0]}): " + sep.join(fields[1:])
        return sep.join(fields)
    sentences = []   # prose
    for k, (f, val) in enumerate(items):
        subject = name if k == 0 or rng.random() < 0.5 else "Its"
        if subject == "Its":
            sentences.append(f"Its {f} is {val}.")
        else:
            sentences.append(rng.choice([f"The {f} of {name} is {val}.", f"{name} has a {f} of {val}.",
                                         f"{name}'s {f} is {val}.", f"For {name}, the {f} is {val}.",
                                         f"{val} is the {f} of {name}."]))
    return " ".join(sentences)   # never re-cased: the answer must stay a verbatim span


def rigid_drill(v, rng):
    """The first level: one `key: value` record with one-word keys and short values, asked in one
    wording. Content-addressed copying (find the key the question names, copy what follows) has to
    click here first: a tiny model given every shape at once learned none of them in 500 steps."""
    fields, n = [], rng.randint(2, 4)
    while len(fields) < n:
        f = v.word()
        if f not in fields:
            fields.append(f)
    name = v.name()
    values = {f: v.value(rng.choice(["name", "word", "year", "code"])) for f in fields}
    text = "\n".join(f"{f}: {values[f]}" for f in fields)
    field = rng.choice(fields)
    return [{"id": "d0", "title": name, "text": text}], 0, f"What is the {field} of {name}?", values[field]


def record_drill(v, rng, shape, num_docs):
    schema = _schema(v, rng)
    names = _entities(v, rng, num_docs, related=num_docs > 1 and rng.random() < 0.4)
    values = _fill(v, names, schema)
    docs = [{"id": f"d{k}", "title": name, "text": render_record(rng, name, vals, shape)}
            for k, (name, vals) in enumerate(zip(names, values))]
    gold = rng.randrange(num_docs)
    field = rng.choice(schema)[0]
    return docs, gold, field_question(rng, names[gold], field, noun=v.word()), values[gold][field]


def table_drill(v, rng, num_docs):
    schema = _schema(v, rng)[:rng.randint(2, 4)]
    docs, facts, headers = [], [], []
    sep = rng.choice([" | ", " | ", "\t", ", "])   # real tables: pipes, tabs (/etc files, TSV), commas
    for k in range(num_docs):
        names = _entities(v, rng, rng.randint(2, 5))
        rows = _fill(v, names, schema)
        header = rng.choice(["name", "entry", "item", v.word()])
        lines = [sep.join([header] + [_key(rng, f) for f, _ in schema])]
        lines += [sep.join([n] + [row[f] for f, _ in schema]) for n, row in zip(names, rows)]
        docs.append({"id": f"d{k}", "title": v.phrase(1, 3).capitalize(), "text": "\n".join(lines)})
        facts.append((names, rows))
        headers.append(header)
    gold = rng.randrange(num_docs)
    names, rows = facts[gold]
    i, field = rng.randrange(len(names)), rng.choice(schema)[0]
    value = rows[i][field]
    if rng.random() < 0.25 and sum(row[field] == value for row in rows) == 1:
        # the other way round: which row has this value? ("Which status code has the reason phrase Not Found?")
        header = headers[gold]
        question = rng.choice(REVERSE_QUESTIONS).format(h=header, f=field, v=value)
        return docs, gold, question, names[i]
    return docs, gold, field_question(rng, names[i], field, noun=headers[gold]), value


REVERSE_QUESTIONS = ["Which {h} has the {f} {v}?", "Which {h} has {v} as its {f}?", "What {h} has a {f} of {v}?",
                     "Whose {f} is {v}?", "Which {h} is listed with {f} {v}?"]


TERM_QUESTIONS = {
    "glossary": ["What does {t} mean?", "What is the meaning of {t}?", "Define {t}.", "What is {t}?",
                 "How is {t} defined?", "What is meant by {t}?"],
    "list": ["What is {t}?", "What does {t} do?", "What is {t} described as?", "Describe {t}.", "What is {t} for?"],
}


def render_terms(rng, v, shape, terms, meanings):
    """(title, text) of a glossary page or a bulleted list of terms and what they mean."""
    if shape == "glossary":
        style = rng.randrange(3)
        if style == 0:
            lines = [f"{t}: {m}." for t, m in zip(terms, meanings)]
        elif style == 1:
            lines = [f"{t} ({rng.choice(['n.', 'v.', 'adj.', 'noun', 'verb'])}) {m}." for t, m in zip(terms, meanings)]
        else:
            lines = [f"{t}\n    {m}." for t, m in zip(terms, meanings)]
        return rng.choice(["Glossary", "Dictionary", "Terms", v.word().capitalize() + " glossary"]), "\n".join(lines)
    bullet, sep = rng.choice(["- ", "* ", "{n}. "]), rng.choice([" - ", ": ", " -- "])
    lines = [bullet.format(n=j + 1) + f"{t}{sep}{m}" for j, (t, m) in enumerate(zip(terms, meanings))]
    return v.phrase(1, 3).capitalize(), "\n".join(lines)


def term_drill(v, rng, shape, num_docs):
    """Glossary pages or bulleted lists: terms and what they mean; the answer is a meaning."""
    docs, facts = [], []
    for k in range(num_docs):
        terms = [t.lower() if rng.random() < 0.5 else t for t in _entities(v, rng, rng.randint(2, 6))]
        meanings = [v.phrase(2, 5) for _ in terms]
        title, text = render_terms(rng, v, shape, terms, meanings)
        docs.append({"id": f"d{k}", "title": title, "text": text})
        facts.append((terms, meanings))
    gold = rng.randrange(num_docs)
    terms, meanings = facts[gold]
    i = rng.randrange(len(terms))
    return docs, gold, rng.choice(TERM_QUESTIONS[shape]).format(t=terms[i]), meanings[i]


def manual_drill(v, rng, num_docs):
    docs, facts = [], []
    for k in range(num_docs):
        cmd = v.word() + rng.choice(["", "", "ctl", "d", "-" + v.word()])
        summary = v.phrase(2, 5)
        options = []
        for _ in range(rng.randint(1, 4)):
            long = v.word()
            if long not in [o[1] for o in options]:
                options.append((long[0], long, v.phrase(2, 6)))
        lines = ["NAME", f"    {cmd} - {summary}", "", "SYNOPSIS", f"    {cmd} [OPTION]... [{v.word().upper()}]...", "",
                 "OPTIONS"]
        for short, long, desc in options:
            lines += [f"    -{short}, --{long}", f"        {desc}"]
        docs.append({"id": f"d{k}", "title": f"{cmd}({rng.randint(1, 8)})", "text": "\n".join(lines)})
        facts.append((cmd, summary, options))
    gold = rng.randrange(num_docs)
    cmd, summary, options = facts[gold]
    if rng.random() < 0.4:
        q = rng.choice(["What does {c} do?", "What is {c}?", "What is the {c} command for?", "What does the {c} command do?",
                        "Describe the {c} command."]).format(c=cmd)
        return docs, gold, q, summary
    short, long, desc = rng.choice(options)
    if rng.random() < 0.6:
        q = rng.choice(["What does the --{o} option of {c} do?", "What does {c} --{o} do?",
                        "In {c}, what is --{o} for?"]).format(o=long, c=cmd)
        return docs, gold, q, desc
    q = rng.choice(["Which option of {c} does this: {d}?", "What is the long option of {c} that means: {d}?"]).format(c=cmd, d=desc)
    return docs, gold, q, f"--{long}"


# What a value is called when the document gives it no key: the question names its kind, the
# document shows it only by its form (a number, a short upper-case code, a phrase).
KIND_NOUNS = {
    "number": ["number", "count", "index", "port", "numeric value", "number code", "numeric code", "no."],
    "code": ["abbreviation", "symbol", "letter code", "short code", "alphabetic code", "short name", "tag"],
    "phrase": ["description", "message", "meaning", "text", "summary", "phrase", "explanation", "label",
               "comment", "note", "purpose", "definition", "reason"],
}
SHORT_NOUNS = ["code", "value", "identifier", "id"]   # fit a number or a code when the document has one of them
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def kind_noun(rng, v, kind, value, short_unique):
    """How a question names a value of this kind: its kind noun, sometimes after a modifier word
    ("reason phrase", "error message", "port number"), sometimes by its length ("three-letter code")."""
    if short_unique and kind != "phrase" and rng.random() < 0.3:
        noun = rng.choice(SHORT_NOUNS)
    else:
        noun = rng.choice(KIND_NOUNS[kind])
    if kind == "code" and rng.random() < 0.4 and len(value) in COUNT_WORDS:
        noun = f"{rng.choice([COUNT_WORDS[len(value)], str(len(value))])}-letter {rng.choice(['code', 'code', 'abbreviation'])}"
    elif kind == "number" and rng.random() < 0.2 and len(value) in COUNT_WORDS:
        noun = f"{rng.choice([COUNT_WORDS[len(value)], str(len(value))])}-digit {rng.choice(['number', 'code'])}"
    elif rng.random() < 0.35:
        noun = f"{v.word()} {noun}"
    return noun


def unkeyed_drill(v, rng, num_docs):
    """One-line entries whose values carry no key ("EPERM (errno 1): Operation not permitted",
    "ftp  21/tcp  # File Transfer", "404 Not Found", "Lebanon LB LBN 422"): the question names
    the kind of value it wants, and the document says which value is which only by its form."""
    layout = rng.randrange(6)
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    names = _entities(v, rng, num_docs, related=num_docs > 1 and rng.random() < 0.3)
    code_lengths = rng.sample([2, 3, 4], 2)
    digits = rng.choice([1, 2, 3, 4]) if num_docs < 5 else rng.choice([2, 3, 4])
    numbers = rng.sample(range(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits), num_docs)
    docs, facts = [], []
    for k, name in enumerate(names):
        number = str(numbers[k])
        phrase = v.phrase(1, 5)
        phrase = phrase.capitalize() if rng.random() < 0.5 else (phrase.title() if rng.random() < 0.5 else phrase)
        codes = ["".join(rng.choice(letters) for _ in range(n)) for n in code_lengths]
        if layout == 0:     # NAME (word N): Phrase
            key, values = name.upper(), {"number": number, "phrase": phrase}
            text = f"{key} ({v.word()} {number}): {phrase}"
        elif layout == 1:   # N Phrase: the number names the entry
            key, values = number, {"phrase": phrase}
            text = f"{number} {phrase}" + (f"\n{v.phrase(3, 8).capitalize()}." if rng.random() < 0.5 else "")
        elif layout == 2:   # name<TAB>N/word<TAB># Phrase
            key, values = name.lower(), {"number": number, "phrase": phrase}
            text = f"{key}\t\t{number}/{rng.choice(['tcp', 'udp', v.word()])}\t\t# {phrase}"
        elif layout == 3:   # Name CODE [CODE] N
            key, values = name, {"code": codes[0], "number": number}
            row = [name, codes[0]] + ([codes[1]] if rng.random() < 0.5 else []) + [number]
            text = rng.choice([" ", "\t", ", ", " | "]).join(row)
            if len(row) == 4:
                values["second code"] = codes[1]
        elif layout == 4:   # name - phrase
            key, values = name.lower(), {"phrase": phrase}
            text = f"{key} {rng.choice(['-', '--', ':'])} {phrase}"
        else:               # Name: Phrase [CODE]
            key, values = name, {"phrase": phrase, "code": codes[0]}
            text = f"{name}: {phrase} [{codes[0]}]"
        docs.append({"id": f"d{k}", "title": key if rng.random() < 0.5 else v.phrase(1, 2).capitalize(), "text": text})
        facts.append((key, values))
    gold = rng.randrange(num_docs)
    key, values = facts[gold]
    phrase_noun = lambda: kind_noun(rng, v, "phrase", "", False)
    if "phrase" in values and rng.random() < 0.25:
        # the other way round: which entry has this phrase? ("Which status code has the reason phrase Not Found?")
        answer = values.get("number", key)
        q = rng.choice(["Which {n} has the {p} {v}?", "What {n} has {p} {v}?", "Which {n} means {v}?",
                        "What is the {n} for {v}?"]).format(n=kind_noun(rng, v, "number", answer, True), p=phrase_noun(),
                                                            v=values["phrase"])
        return docs, gold, q, answer
    kind = rng.choice([k for k in values if k != "second code"] + (["second code"] if "second code" in values else []))
    answer = values[kind]
    if kind in ("code", "second code") and "second code" in values:
        noun = f"{COUNT_WORDS[len(answer)]}-letter code"   # two codes: only the length tells them apart
    else:
        noun = kind_noun(rng, v, kind, answer, short_unique=sum(k != "phrase" for k in values) == 1)
    entity = key
    if rng.random() < 0.3:   # the kind of entry before its name ("HTTP status code 404", "the error EPERM")
        entity = (f"{v.word()} {rng.choice(['number', 'code', 'no.'])} {key}" if key.isdigit()
                  else f"{rng.choice(['the ', ''])}{v.word()} {key}")
    q = rng.choice(QUESTIONS).format(f=noun, e=entity)   # not field_question: its head nouns would name a kind
    return docs, gold, q[0].upper() + q[1:], answer


# Long entries (a package record, a dictionary entry, an infobox with its article): a headword, many
# `Key: value` lines of which several hold values of one kind (three versions, two people, four
# numbers), then prose. Only finding the entry the question names, then the key it asks for,
# answers them: the kind of a value no longer tells it apart. Some keys are ones real records use,
# asked by another name; the rest are English words, asked with a word added or dropped or the
# words swapped. (A few of these keys, version, homepage, license, author, summary, also appear in
# the dpkg and pymeta development sets of kb_tools.machine_qa; their layouts and values do not.)
COMMON_KEYS = {
    "version": ["release", "version number"], "homepage": ["home page", "website", "web site"],
    "license": ["licence", "licensing terms"], "author": ["writer", "creator"], "summary": ["short description", "synopsis"],
    "population": ["number of inhabitants", "inhabitants"], "area": ["surface area", "total area"],
    "capital": ["capital city", "seat of government"], "founded": ["founding year", "year founded"],
    "headquarters": ["head office", "main office"], "language": ["spoken language", "main language"],
    "birth date": ["date of birth", "birthday"], "birthplace": ["place of birth", "birth place"],
    "elevation": ["altitude", "height above sea level"], "genre": ["style", "kind of work"],
    "publisher": ["publishing house", "published by"], "release date": ["date of release", "released on"],
    "running time": ["runtime", "duration"], "employees": ["number of employees", "workforce", "staff"],
    "telephone": ["phone number", "phone"], "email": ["e-mail address", "email address"], "owner": ["proprietor"],
    "location": ["place", "site"], "status": ["state", "current status"], "editor": ["edited by"],
    "contact": ["contact person"], "updated": ["last update", "date of the last update"], "size": ["file size", "disk size"],
}
KEY_KINDS = {"version": "version", "homepage": "url", "author": "person", "summary": "phrase", "license": "code",
             "population": "number", "area": "number", "capital": "name", "founded": "year", "headquarters": "name",
             "language": "name", "birth date": "date", "birthplace": "name", "elevation": "number", "genre": "phrase",
             "publisher": "name", "release date": "date", "running time": "number", "employees": "number",
             "telephone": "number", "email": "url", "owner": "person", "location": "name", "status": "word",
             "editor": "person", "contact": "person", "updated": "date", "size": "number"}
ENTRY_NOUNS = ["package", "entry", "item", "record", "article", "page", "program", "library", "project", "term"]
# Real records qualify a key with a word and keep both ("Version" beside "Metadata-Version", "Area"
# beside "Urban area", "Release date" beside "Original release date"), values of one kind: asked for
# either, only the whole key picks the line.
QUALIFIERS = ["minimum", "maximum", "original", "previous", "latest", "metadata", "build", "urban", "total",
              "estimated", "source", "upstream", "required", "official", "local", "former"]
ENTRY_CHARS = 1000   # all entries of one drill, per 512 tokens of context: ~370 tokens, so they fit with the question


def _entry_schema(v, rng):
    """5-10 (key, kind) pairs, 2-4 of them holding one kind of value, so the key must be read."""
    n, shared = rng.randint(5, 10), rng.choice(["number", "version", "person", "name", "date", "code", "phrase"])
    keys = rng.sample(sorted(COMMON_KEYS), rng.randint(1, 4))
    schema = [(k, shared if rng.random() < 0.3 else KEY_KINDS[k]) for k in keys]
    while len(schema) < n:
        f = v.field()
        if f not in (k for k, _ in schema):
            schema.append((f, shared if sum(kind == shared for _, kind in schema) < 4 and rng.random() < 0.5
                           else rng.choice(VALUE_KINDS + ["version", "url"])))
    if rng.random() < 0.4:   # a qualified twin of one key, holding a value of the same kind
        key, kind = rng.choice([(k, kind) for k, kind in schema if len(k.split()) == 1] or schema)
        q = rng.choice(QUALIFIERS)
        schema.append((f"{q} {key}" if rng.random() < 0.7 else f"{key} {q}", kind))
    rng.shuffle(schema)
    return schema


def _twin(schema):
    """The (plain, qualified) keys of the schema's qualified twin, or None."""
    keys = [k for k, _ in schema]
    return next(((k, t) for k in keys for t in keys if t != k and k in t.split(" ", 1) + t.rsplit(" ", 1)), None)


def _entry_values(v, rng, schema):
    """{key: (answer, as written)}: distinct values (two equal versions would let a wrong key pass)."""
    values, seen = {}, set()
    for key, kind in schema:
        for _ in range(10):
            if kind == "person":
                answer, written = v.person()
            else:
                answer = written = v.value(kind)
            if answer not in seen:
                break
        seen.add(answer)
        values[key] = (answer, written)
    return values


def render_entry(rng, v, name, values, paragraph, layout):
    """An entry's text: its fields in one of four layouts, and a paragraph of real prose."""
    items = list(values.items())
    if layout == "control":   # Debian-control style: Title-Case-Hyphen keys, the prose as an indented continuation
        lines = [f"{rng.choice(['Package', 'Name'])}: {name}"]
        lines += ["-".join(w.capitalize() for w in k.split()) + f": {written}" for k, (_, written) in items]
        prose = [" " + line for line in _wrap(paragraph)]
        return "\n".join(lines + [f"Description: {v.phrase(2, 5)}"] + prose)
    if layout == "infobox":
        box = "\n".join(f"| {_key(rng, k)} | {written} |" for k, (_, written) in items)
        return f"{box}\n\n{paragraph}" if paragraph else box
    sep = rng.choice([": ", ": ", " = ", " - "])
    fields = "\n".join(f"{_key(rng, k)}{sep}{written}" for k, (_, written) in items)
    if layout == "prose first":
        return f"{paragraph}\n\n{fields}" if paragraph else fields
    head = name if rng.random() < 0.5 else name.upper()   # dictionary style: the headword, then its fields
    return f"{head}\n{fields}\n\n{paragraph}" if paragraph else f"{head}\n{fields}"


def _wrap(text, width=72):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _asked_key(rng, key):
    """How a question names a key: another name real users give it, or the key with a word
    dropped, added or the words swapped ("release date" asked as "date of release")."""
    if key in COMMON_KEYS and rng.random() < 0.5:
        return rng.choice(COMMON_KEYS[key])
    words = key.split()
    r = rng.random()
    if len(words) == 2 and r < 0.15:
        return f"{words[1]} of {words[0]}"
    if len(words) == 2 and r < 0.3:
        return words[rng.randrange(2)]
    return key


def entry_drill(v, rng, num_docs, paragraphs, entry_chars=ENTRY_CHARS):
    """Long multi-field entries of one shape about different things (names that often share a
    part, as `libxml-parser-perl` and `libxml-twig-perl` do); the question names one entry's
    headword and asks for a field in other words. Multi-word values are copied whole."""
    schema = _entry_schema(v, rng)
    identifiers = rng.random() < 0.5
    names, seen = [], set()
    shared = v.word()
    while len(names) < num_docs:
        name = v.identifier() if identifiers else v.name()
        if num_docs > 1 and rng.random() < 0.5:   # a near miss: the same first part
            name = f"{shared}-{v.word()}" if identifiers else f"{shared.capitalize()} {v.word().capitalize()}"
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    layout = rng.choice(["control", "infobox", "dictionary", "prose first"])
    budget = entry_chars // num_docs
    docs, facts = [], []
    for k, name in enumerate(names):
        values = _entry_values(v, rng, schema)
        room = budget - sum(len(k_) + len(w) + 4 for k_, (_, w) in values.items())
        paragraph = " ".join(rng.choice(paragraphs).split())[:max(0, room)].rsplit(" ", 1)[0] if paragraphs and room > 80 else ""
        docs.append({"id": f"d{k}", "title": name, "text": render_entry(rng, v, name, values, paragraph, layout)})
        facts.append(values)
    gold = rng.randrange(num_docs)
    # a value that is part of the headword ("forest" of forest-copper) or the key would be given away by the question
    keys = [k for k, _ in schema if facts[gold][k][0].lower() not in f"{names[gold]} {k}".lower()] or [k for k, _ in schema]
    key = rng.choice(keys)
    twin = _twin(schema)
    if twin and rng.random() < 0.7 and all(k in keys for k in twin):
        key = rng.choice(twin)   # asked for one of the two: "version" must not answer "metadata version"
    noun = rng.choice(ENTRY_NOUNS) if rng.random() < 0.5 else None
    # a qualified key is asked whole (dropping its qualifier would ask for its twin)
    whole = bool(twin) and key in twin
    question = field_question(rng, names[gold], key if whole else _asked_key(rng, key), noun=noun, shorten=not whole)
    return docs, gold, question, facts[gold][key][0]


def cloze_drill(rng, paragraphs, num_docs):
    """A real paragraph, a sentence of it with a span blanked out: the span is the answer."""
    for _ in range(20):
        chosen = rng.sample(paragraphs, num_docs)
        gold = rng.randrange(num_docs)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(chosen[gold].split())) if 6 <= len(s.split()) <= 30]
        if not sentences:
            continue
        words = rng.choice(sentences).split()
        span_len = rng.randint(1, 3)
        start = rng.randrange(1, len(words) - span_len)
        span = " ".join(words[start:start + span_len]).strip(".,;:()\"'`")
        if not re.fullmatch(r"[\w][\w .,-]*", span):
            continue
        blanked = " ".join(words[:start] + ["___"] + words[start + span_len:])
        q = rng.choice(["Fill in the blank from the document: {s}", "Complete from the text: {s}",
                        "Which words are missing? {s}"]).format(s=blanked)
        docs = [{"id": f"d{k}", "title": p.split("\n", 1)[0][:60], "text": p[:1200]} for k, p in enumerate(chosen)]
        if span and span in docs[gold]["text"]:
            return docs, gold, q, span
    return None


# -----------------------------------------------------------------------------
# The task

class ReadingDrills(Task):
    """Endless reading drills. level 1: one `key: value` record, one question wording (rigid_drill);
    level 2: one document of any shape; level 3: 2-5 documents of the same shape (the RAG wrapper
    shows the retriever's top 3, in random order). split 'train' uses the
    training words, names and shapes; 'heldout' only held-out words and names, all shapes."""

    def __init__(self, level=1, split="train", num_examples=100_000, seed=0, words=None, paragraphs=None, unkeyed=True,
                 only=None, context_len=512, **kwargs):
        super().__init__(**kwargs)
        assert level in (1, 2, 3), f"level must be 1, 2 or 3, got {level}"
        assert split in ("train", "heldout"), f"split must be train or heldout, got {split!r}"
        self.level, self.split, self.n, self.seed = level, split, num_examples, seed
        self.entry_chars = ENTRY_CHARS * context_len // 512   # a longer context reads longer entries
        if words is None:
            train_words, heldout_words = english_words()
            words = train_words if split == "train" else heldout_words
        self.words = words
        self.paragraphs = paragraphs if paragraphs is not None else [p for p in real_corpus() if len(p) >= 200]
        # the held-out split has every shape but cloze (its paragraphs are the training corpus)
        self.shapes = [s for s in SHAPES if s not in HELDOUT_SHAPES] if split == "train" else [s for s in SHAPES if s != "cloze"]
        if len(self.paragraphs) < 10:
            self.shapes = [s for s in self.shapes if s != "cloze"]
        if not unkeyed:
            self.shapes = [s for s in self.shapes if s != "unkeyed"]
        # unkeyed and long entries twice: most real reference files are one or the other
        self.choices = self.shapes + ["entry"] + (["unkeyed"] if unkeyed else [])
        if only:   # these shapes alone (the `entries` task: long multi-field entries)
            self.shapes = self.choices = [s for s in self.shapes if s in only]
            assert self.shapes, f"no shape of {only} in this split"

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def _drill(self, rng, v):
        """(shape, documents, gold index, question, answer) of one example."""
        if self.level == 1:
            return ("rigid", *rigid_drill(v, rng))
        num_docs = 1 if self.level == 2 else rng.randint(2, 5)
        while True:   # a cloze draw can fail (no usable sentence): draw again
            shape = rng.choice(self.choices)
            if shape in FIELD_SHAPES:
                made = record_drill(v, rng, shape, num_docs)
            elif shape == "entry":
                made = entry_drill(v, rng, num_docs if num_docs == 1 else rng.randint(2, 3), self.paragraphs, self.entry_chars)
            elif shape == "cloze":
                made = cloze_drill(rng, self.paragraphs, num_docs)
            elif shape in TERM_QUESTIONS:
                made = term_drill(v, rng, shape, num_docs)
            else:
                made = {"table": table_drill, "manual": manual_drill, "unkeyed": unkeyed_drill}[shape](v, rng, num_docs)
            if made is None:
                continue
            docs = made[0]
            if shape not in ("cloze", "entry") and self.paragraphs and rng.random() < 0.3:
                # real documents carry text nobody asks about (a DESCRIPTION, notes): after the
                # facts, a piece of a real paragraph, short enough that documents are not cut
                limit = 600 if num_docs == 1 else 250
                for d in docs:
                    d["text"] += "\n\n" + " ".join(rng.choice(self.paragraphs).split())[:rng.randint(limit // 3, limit)]
            return (shape, *made)

    def get_example(self, index):
        rng = random.Random(f"read-{self.split}-{self.seed}-{self.level}-{index}")
        shape, docs, gold, question, answer = self._drill(rng, Vocab(self.words, rng))
        assert answer in docs[gold]["text"], (answer, docs[gold]["text"])
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "answers": [answer], "supporting_ids": [docs[gold]["id"]], "hops": [docs[gold]["id"]],
                "kb": docs, "type": shape}

    def evaluate(self, conversation, completion):
        return exact_match(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        return qa_reward(completion, conversation["answers"])


@lru_cache(maxsize=2)
def _drills_for_pretraining(split):
    # no unkeyed drills here: with them in pretraining, SFT's first stage (world1) stalled at ~65%
    # batch EM for 600 steps instead of passing 90% by step ~150 (one run, runs/cpu_unkeyed)
    return {level: ReadingDrills(level, split, 10 ** 9, unkeyed=False) for level in (1, 2)}


def pretraining_text(index, split="train"):
    """Plain-text reading drills for base pretraining (document `index` of an endless stream): a few
    documents, each followed by `Q:`/`A:` lines, half of them the rigid level. The loss on the
    answers can only be lowered by copying from the document just above, so pretraining already
    forms the content-addressed copying that SFT's reading stages need."""
    rng = random.Random(f"read-pretrain-{split}-{index}")
    drills = _drills_for_pretraining("train" if split == "train" else "heldout")
    blocks = []
    for _ in range(rng.randint(3, 6)):
        ex = drills[rng.choice((1, 2))][rng.randrange(10 ** 9)]
        docs = "\n\n".join(f"{d['title']}\n{d['text']}" for d in ex["kb"])
        blocks.append(f"{docs}\nQ: {ex['messages'][0]['content']}\nA: {ex['answers'][0]}")
    return "\n\n".join(blocks)


def reading_task(level, split="train", num_examples=None, seed=0, only=None, context_len=512):
    """Drills wrapped for RAG: each example's own documents searched by BM25 (top 3), shown in
    random order so that the answer is not always in document [1]. only: these shapes alone.
    context_len: the model's (long entries are sized to fit it)."""
    from tasks.rag import RAGTask
    base = ReadingDrills(level, split, num_examples or (100_000 if split == "train" else 500), seed, only=only,
                         context_len=context_len)
    return RAGTask(base, "bm25", 1 if level <= 2 else 3, shuffle=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print reading drills as the model sees them")
    parser.add_argument("--show", type=int, default=5, help="how many examples")
    parser.add_argument("--level", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from tasks.rag import describe
    task = reading_task(args.level, args.split, seed=args.seed)
    for i in range(args.show):
        print(describe(task[i]))
        print("-" * 80)

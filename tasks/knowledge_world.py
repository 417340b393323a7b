"""
A fictional encyclopedia: the offline default for learning to read retrieved documents.

People, cities, organisations and works with made-up two-syllable names ("Balun", "Toral"),
one short encyclopedia article per entity, and questions about them: single-hop, 2-hop
bridges ("Where was the founder of Kelto born?"), comparisons ("Who was born first, Balun
or Dorik?") and 3-hop chains. Every fact is invented, so a model can only answer by
reading the documents — and the design follows what was measured on a CPU:

- Names are split once and for all into a training and a held-out set by a hash of the
  name, so no world the training side generates, even an endless stream of them, ever
  contains a held-out name. Held-out questions can only be answered by retrieving.
- A fixed training world gets memorised by a small model (73% train, 0% held-out), so for
  training there is an endless stream of fresh mini-worlds, each with its own small KB.
- Question wordings differ in their first words by what they ask (Where/When/Who/What job),
  so the answer type is known early; `rigid=True` uses one article template and one
  phrasing per question for the first curriculum stage.

    python -m tasks.knowledge_world --out DIR          # KB inputs + QA files of both worlds
    python -m tasks.knowledge_world --out DIR --realm  # also a corpus for retrieval-augmented pretraining
"""
import os
import json
import zlib
import random
import argparse

from tasks.common import Task
from nanochat.rag import answer_text, exact_match, qa_reward, ABSTAIN

# -----------------------------------------------------------------------------
# Names: onset-vowel + onset-vowel-coda, e.g. Ba+lun. 14*5 * 14*5*7 = 34,300 names.

ONSETS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()
CODAS = ["", "n", "l", "r", "s", "k", "m"]

PROFESSIONS = ("baker painter sailor farmer doctor teacher poet weaver potter miner singer judge "
               "tailor builder hunter fisher dancer merchant soldier priest").split()
INDUSTRIES = "shipping mining textiles banking farming printing brewing glassmaking timber railways fishing pottery".split()
GENRES = "novel poem play song ballad film story hymn".split()   # no vowel first: "a {genre}"
PRODUCTS = "salt wine glass silk cheese horses bridges olives copper music tea wool".split()

HELDOUT_BUCKETS = 8   # one name in 8 is held out
# Training worlds draw a job, product, industry or genre from an open set half the time (an invented
# lower-case word): from a dozen values a model lowers its loss by guessing the commonest instead of
# reading, and some base seeds never left that (session 16: a seed-2 base answered "film" to every
# genre question and "pottery" to every industry one, even after SFT). The held-out world keeps the lists.
OPEN_VALUE_SHARE = 0.5


def is_heldout_name(name):
    # crc32, not hash(): Python's string hash changes from run to run
    return zlib.crc32(name.encode()) % HELDOUT_BUCKETS == 0


def _all_names():
    words = set(PROFESSIONS + INDUSTRIES + GENRES + PRODUCTS)
    names = []
    for o1 in ONSETS:
        for v1 in VOWELS:
            for o2 in ONSETS:
                for v2 in VOWELS:
                    for c in CODAS:
                        name = o1 + v1 + o2 + v2 + c
                        if name not in words:   # "novel" would make a confusing name
                            names.append(name.capitalize())
    return names


ALL_NAMES = _all_names()
TRAIN_NAMES = [n for n in ALL_NAMES if not is_heldout_name(n)]
HELDOUT_NAMES = [n for n in ALL_NAMES if is_heldout_name(n)]
OPEN_WORDS = [n.lower() for n in TRAIN_NAMES if n[0] not in "AEIOU"]   # invented values: consonant first ("a {genre}")

# -----------------------------------------------------------------------------
# Articles. Template 0 of each kind is the rigid one; the others vary word order and
# wording so that reading, not position, finds the fact.

ARTICLES = {
    "person": [
        "{name} was born in {born_in} in {year}. {name} works as a {job}.",
        "{name} (born {year} in {born_in}) is a {job}.",
        "{name} is a {job} who was born in {born_in} in {year}.",
        "Born in {born_in} in {year}, {name} became a {job}.",
        "{name}, a {job} from {born_in}, was born in {year}.",
    ],
    "org": [
        "{name} was founded by {founder} in {year}. {name} is a {industry} company based in {city}.",
        "{name} is a {industry} company based in {city}, founded by {founder} in {year}.",
        "Founded in {year} by {founder}, {name} is a {industry} firm with its seat in {city}.",
        "{founder} founded {name}, a {industry} company in {city}, in {year}.",
    ],
    "work": [
        "{name} is a {genre} written by {author} in {year}.",
        "{name} ({year}) is a {genre} by {author}.",
        "{author} wrote the {genre} {name} in {year}.",
        "The {genre} {name} was written by {author} and appeared in {year}.",
    ],
    "city": [
        "{name} is a city in {country}. {name} is known for {known_for}.",
        "{name}, a city in {country}, is famous for its {known_for}.",
        "The city of {name} lies in {country} and is known for {known_for}.",
    ],
}

# Questions per (kind, attribute); phrasing 0 is the rigid one. {e} is a name or a
# description such as "the founder of Kelto", so multi-hop questions compose from these.
QUESTIONS = {
    ("person", "born_in"): ["Where was {e} born?", "In which city was {e} born?", "What is the birthplace of {e}?"],
    ("person", "year"): ["When was {e} born?", "In what year was {e} born?", "What is the birth year of {e}?"],
    ("person", "job"): ["What job does {e} have?", "What is the profession of {e}?", "What does {e} do for a living?"],
    ("org", "founder"): ["Who founded {e}?", "Who is the founder of {e}?", "Which person founded {e}?"],
    ("org", "city"): ["Where is {e} based?", "In which city is {e} based?", "Which city is the home of {e}?"],
    ("org", "year"): ["When was {e} founded?", "In what year was {e} founded?", "What is the founding year of {e}?"],
    ("org", "industry"): ["What industry is {e} in?", "Which industry does {e} work in?", "What business is {e} in?"],
    ("work", "author"): ["Who wrote {e}?", "Who is the author of {e}?", "Which person wrote {e}?"],
    ("work", "year"): ["When was {e} written?", "In what year was {e} written?", "What year is {e} from?"],
    ("work", "genre"): ["What kind of work is {e}?", "What genre is {e}?", "What type of work is {e}?"],
    ("city", "country"): ["Which country is {e} in?", "In which country is {e}?", "What country is {e} in?"],
    ("city", "known_for"): ["What is {e} known for?", "What is {e} famous for?", "What makes {e} famous?"],
}
# relations lead from one entity to another; their phrase describes the target
RELATIONS = {
    ("org", "founder"): ("person", "the founder of {e}"),
    ("work", "author"): ("person", "the author of {e}"),
    ("person", "born_in"): ("city", "the birthplace of {e}"),
    ("org", "city"): ("city", "the home city of {e}"),
}
COMPARISONS = {
    "person": ["Who was born first, {a} or {b}?", "Who is older, {a} or {b}?", "Which person was born earlier, {a} or {b}?"],
    "org": ["Which was founded first, {a} or {b}?", "Which company is older, {a} or {b}?", "Which was founded earlier, {a} or {b}?"],
    "work": ["Which was written first, {a} or {b}?", "Which work is older, {a} or {b}?", "Which was written earlier, {a} or {b}?"],
}
# Descriptive questions name an entity by some of its facts, never by its name ("Who founded the
# glassmaking company in Toral that was set up in 1843?"): the retriever has to match facts, not a title.
# (kind, asked attribute) -> [(template, the facts it names)]; a question is asked only if those
# facts single out one entity of the world.
DESCRIPTIVE = {
    ("person", "job"): [("What does the person born in {born_in} in {year} do for a living?", ("born_in", "year")),
                        ("Which profession does the native of {born_in} born in {year} have?", ("born_in", "year"))],
    ("person", "year"): [("When was the {job} from {born_in} born?", ("job", "born_in")),
                         ("In what year was the {job} who comes from {born_in} born?", ("job", "born_in"))],
    ("person", "born_in"): [("Where was the {job} born in {year} born?", ("job", "year")),
                            ("Which city is the {job} born in {year} from?", ("job", "year"))],
    ("org", "founder"): [("Who founded the {industry} company in {city} that was set up in {year}?", ("industry", "city", "year")),
                         ("Who started the {industry} firm based in {city}?", ("industry", "city"))],
    ("org", "year"): [("When was the {industry} company of {city} founded?", ("industry", "city")),
                      ("In which year did {founder} found a {industry} business?", ("founder", "industry"))],
    ("org", "city"): [("Where is the {industry} company that {founder} founded based?", ("industry", "founder")),
                      ("In which city is the {industry} firm from {year} based?", ("industry", "year"))],
    ("org", "industry"): [("What business is the company that {founder} founded in {year} in?", ("founder", "year"))],
    ("work", "author"): [("Who wrote the {genre} that appeared in {year}?", ("genre", "year")),
                         ("Which writer is behind the {genre} from {year}?", ("genre", "year"))],
    ("work", "year"): [("When did {author} write the {genre}?", ("author", "genre"))],
    ("work", "genre"): [("What kind of work did {author} write in {year}?", ("author", "year"))],
}
# multi-hop paths: (start kind, relations followed, final attribute's kind)
PATHS_2HOP = [("org", ["founder"]), ("work", ["author"]), ("person", ["born_in"]), ("org", ["city"])]
PATHS_3HOP = [("org", ["founder", "born_in"]), ("work", ["author", "born_in"])]


class World:
    """Entities (dicts with a 'kind', a 'name' and attributes) and their articles. Every
    name is unique in a world and is also its document's id and title."""

    def __init__(self, entities, rigid):
        self.entities = {e["name"]: e for e in entities}
        self.rigid = rigid
        self.by_kind = {k: [e for e in entities if e["kind"] == k] for k in ARTICLES}

    def documents(self):
        """The KB: one {"id", "title", "text"} per entity (countries have no article)."""
        return [{"id": e["name"], "title": e["name"], "text": e["text"]} for e in self.entities.values() if e["kind"] in ARTICLES]

    def question(self, rng, hops=1, rigid=None, comparison=False):
        """A random question: {"question", "answers", "hops" (gold doc ids, in reading order),
        "queries" (a search a model can write for each hop: the name it has seen), "type"}.
        hops=1 single-hop, hops=2 a bridge or (one in four) a comparison, hops=3 a chain;
        comparison=True: always a comparison (two documents whatever hops says)."""
        rigid = self.rigid if rigid is None else rigid
        pick = (lambda options: options[0]) if rigid else rng.choice
        if comparison or (hops == 2 and rng.random() < 0.25):
            kind = rng.choice(list(COMPARISONS))
            for _ in range(10):   # two entities of one kind with different years (almost always the first try)
                a, b = rng.sample(self.by_kind[kind], 2)
                if a["year"] != b["year"]:
                    first = a if a["year"] < b["year"] else b
                    return {"question": pick(COMPARISONS[kind]).format(a=a["name"], b=b["name"]),
                            "answers": [first["name"]], "hops": [a["name"], b["name"]],
                            "queries": [a["name"], b["name"]], "type": "comparison"}
        if hops == 1:
            start_kind, relations = rng.choice(list(ARTICLES)), []
        else:
            start_kind, relations = rng.choice(PATHS_2HOP if hops == 2 else PATHS_3HOP)
        entity = rng.choice(self.by_kind[start_kind])
        e, chain = entity["name"], [entity]
        for rel in relations:
            target_kind, phrase = RELATIONS[(chain[-1]["kind"], rel)]
            chain.append(self.entities[chain[-1][rel]])
            e = phrase.format(e=e)
        last = chain[-1]
        attribute = rng.choice([a for (k, a) in QUESTIONS if k == last["kind"]])
        question = pick(QUESTIONS[(last["kind"], attribute)]).format(e=e)
        names = [c["name"] for c in chain]
        return {"question": question, "answers": [str(last[attribute])],
                "hops": names, "queries": names, "type": "single" if hops == 1 else f"{hops}-hop"}

    def descriptive_question(self, rng):
        """A single-hop question that describes its entity by facts (DESCRIPTIVE), or None when
        the drawn description fits more than one entity (redraw)."""
        (kind, attribute), templates = rng.choice(list(DESCRIPTIVE.items()))
        template, facts = rng.choice(templates)
        entity = rng.choice(self.by_kind[kind])
        if sum(all(e[f] == entity[f] for f in facts) for e in self.by_kind[kind]) != 1:
            return None
        return {"question": template.format(**entity), "answers": [str(entity[attribute])], "hops": [entity["name"]],
                "queries": [entity["name"]], "type": "descriptive"}

    def write_kb_input(self, path):
        """The jsonl that `python -m kb_tools.build_kb --input PATH --out KB_DIR` reads."""
        with open(path, "w", encoding="utf-8") as f:
            for doc in self.documents():
                f.write(json.dumps(doc) + "\n")

    def write_qa(self, path, n, hops=1, seed=0, descriptive=False):
        """n questions in tasks.jsonl_qa's format: hops (gold doc ids in order), queries (the name
        to search for at each hop) and type. descriptive: DESCRIPTIVE single-hop questions."""
        rng = random.Random(f"qa-{seed}-{'descriptive' if descriptive else hops}")
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                q = None
                while q is None:
                    q = self.descriptive_question(rng) if descriptive else self.question(rng, hops)
                f.write(json.dumps({"question": q["question"], "answers": q["answers"], "supporting_ids": q["hops"],
                                    "hops": q["hops"], "queries": q["queries"], "type": q["type"]}) + "\n")


def make_world(seed, split="train", people=8, cities=4, orgs=4, works=4, countries=3, rigid=False):
    """A deterministic world: same arguments, same world. split picks the name pool; a training
    world's jobs, products, industries and genres are invented words half the time (OPEN_VALUE_SHARE)."""
    rng = random.Random(f"world-{split}-{seed}")
    pool = TRAIN_NAMES if split == "train" else HELDOUT_NAMES
    assert split in ("train", "heldout"), f"split must be train or heldout, got {split!r}"
    invented = OPEN_WORDS if split == "train" else []
    value = lambda closed: rng.choice(invented) if invented and rng.random() < OPEN_VALUE_SHARE else rng.choice(closed)
    names = iter(rng.sample(pool, people + cities + orgs + works + countries))
    country_names = [next(names) for _ in range(countries)]
    entities = []
    for _ in range(cities):
        entities.append({"kind": "city", "name": next(names), "country": rng.choice(country_names),
                         "known_for": value(PRODUCTS)})
    city_names = [e["name"] for e in entities]
    persons = []
    for _ in range(people):
        persons.append({"kind": "person", "name": next(names), "born_in": rng.choice(city_names),
                        "year": rng.randint(1700, 1960), "job": value(PROFESSIONS)})
    entities += persons
    for _ in range(orgs):
        founder = rng.choice(persons)
        entities.append({"kind": "org", "name": next(names), "founder": founder["name"], "city": rng.choice(city_names),
                         "year": founder["year"] + rng.randint(20, 60), "industry": value(INDUSTRIES)})
    for _ in range(works):
        author = rng.choice(persons)
        entities.append({"kind": "work", "name": next(names), "author": author["name"],
                         "year": author["year"] + rng.randint(18, 70), "genre": value(GENRES)})
    entities += [{"kind": "country", "name": c} for c in country_names]
    for e in entities:
        if e["kind"] in ARTICLES:
            templates = ARTICLES[e["kind"]]
            template = templates[0] if rigid else rng.choice(templates)
            e["text"] = template.format(**e)
    return World(entities, rigid)


def mini_world(rng, split="train", rigid=False):
    """A small random world (10-25 articles) for one training example."""
    return make_world(rng.getrandbits(64), split, people=rng.randint(4, 10), cities=rng.randint(2, 5),
                      orgs=rng.randint(2, 5), works=rng.randint(2, 5), countries=rng.randint(2, 3), rigid=rigid)


def training_world(seed=0, rigid=False):
    """The fixed training world (about 3,000 articles)."""
    return make_world(seed, "train", people=2000, cities=200, orgs=400, works=400, countries=20, rigid=rigid)


def heldout_world(seed=0, rigid=False):
    """The held-out evaluation world (510 articles), names disjoint from any training name."""
    return make_world(seed, "heldout", people=300, cities=50, orgs=80, works=80, countries=8, rigid=rigid)


CLOSED_ATTRIBUTES = ("job", "known_for", "industry", "genre")   # values of a small set (see OPEN_VALUE_SHARE)


def reading_probe(n=100, seed=0):
    """n held-out reading drills shaped as pretraining shows them: one to three articles of a small
    held-out world, up to three answered questions about them, and one more ending in "A:". Returns
    [(text, answers, "common word" | "name or year")]: whether a base model copies from context,
    told apart for values of a closed set, which it can also guess."""
    probes = []
    for i in range(n):
        rng = random.Random(f"reading-probe-{seed}-{i}")
        world = make_world(rng.getrandbits(64), "heldout", people=3, cities=2, orgs=2, works=2, countries=1)
        docs = world.documents()
        rng.shuffle(docs)
        docs = docs[:rng.choice([1, 2, 3])]
        shown, qa = {d["id"] for d in docs}, []
        for _ in range(200):   # up to four, each fact once: a repeated one could be copied from its earlier answer
            q = world.question(rng, 1)
            if q["hops"][0] in shown and all((q["hops"], q["answers"]) != (x["hops"], x["answers"]) for x in qa):
                qa.append(q)
                if len(qa) == 4:
                    break
        # the question to answer last: one whose answer no earlier answer gives away
        last = next((q for q in reversed(qa) if sum(x["answers"] == q["answers"] for x in qa) == 1), qa[-1])
        qa.remove(last)
        qa.append(last)
        entity = world.entities[last["hops"][0]]
        kind = "common word" if any(str(entity.get(a)) == last["answers"][0] for a in CLOSED_ATTRIBUTES) else "name or year"
        text = "\n\n".join(f"{d['title']}\n{d['text']}" for d in docs) + "\n\n"
        text += "\n".join(f"Q: {q['question']}\nA: {q['answers'][0]}" for q in qa[:-1]) + f"\nQ: {last['question']}\nA:"
        probes.append((text, last["answers"], kind))
    return probes


def quiz_corpus(world, seed=0, heldout_frac=0.1, quizzes_per_entity=3):
    """Text for retrieval-augmented pretraining (base_train --retrieval-augment): quizzes, each
    the single-hop questions about one entity ("Q: ...", "A: ..." lines, in a random order and
    phrasing). Their facts are only in the entity's article, which the text never contains: a
    model learns them by heart or reads them from the KB (the world's articles). Returns (train,
    heldout) texts; held-out quizzes are about entities no training quiz asks about."""
    rng = random.Random(f"quiz-{seed}")
    train, heldout = [], []
    for e in world.entities.values():
        if e["kind"] not in ARTICLES:
            continue
        held = rng.random() < heldout_frac
        attributes = [a for (k, a) in QUESTIONS if k == e["kind"]]
        for _ in range(1 if held else quizzes_per_entity):
            rng.shuffle(attributes)
            lines = [f"Q: {rng.choice(QUESTIONS[(e['kind'], a)]).format(e=e['name'])}\nA: {e[a]}" for a in attributes]
            (heldout if held else train).append("\n".join(lines))
    rng.shuffle(train)
    return train, heldout


# -----------------------------------------------------------------------------
# Tasks

def _conversation(q, **extra):
    return {"messages": [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answers"][0]}],
            "answers": q["answers"], "hops": q["hops"], "queries": q["queries"], "type": q["type"], **extra}


def foreign_name(rng, split):
    """A name of another shape than the world's two-syllable ones, made of real English words of
    the split ("Breakpoint", "Showed Feed", "Senslash"): users ask about "France" and "Hamlet",
    and a model that only ever searched for names like "Balun" garbles those in its searches."""
    from tasks.reading import english_words, Vocab
    train_words, heldout_words = english_words()
    return Vocab(train_words if split == "train" else heldout_words, rng).name()


def unanswerable_question(rng, world, other, hops=1, foreign_split=None, foreign_share=0.5):
    """A question about an entity of `other` that `world` never mentions, so the documents of
    `world` cannot answer it: the answer is ABSTAIN. Its one hop is the missing entity (a search
    for it finds only other things). foreign_split: a share of the questions name a foreign_name
    of that split instead (asked the same way)."""
    texts = [d["text"].lower() for d in world.documents()]
    for _ in range(50):
        q = other.question(rng, hops)
        name = q["hops"][0]
        question = q["question"]
        if foreign_split and rng.random() < foreign_share:
            new = foreign_name(rng, foreign_split)
            if new not in question:
                question, name = question.replace(name, new), new
        if q["type"] != "comparison" and name not in world.entities and not any(name.lower() in t for t in texts):
            return {"question": question, "answers": [ABSTAIN], "hops": [name], "queries": [name], "type": "unanswerable"}
    raise RuntimeError("no unanswerable question found in 50 draws (the two worlds share every name?)")


def with_history(example, rng, worlds, turns, split, hops_choices=(1, 1, 2)):
    """The example as the last turn of a conversation of 2..turns questions: the earlier ones about
    one of `worlds` (the example's own world: a follow-up; another: an unrelated question), given
    as text the way a chat sends its history, their answers context, not targets ("trained": False);
    one in five earlier questions was about something the KB lacks (a foreign_name of `split`) and
    was answered ABSTAIN. An unanswerable example stays one (its type, and 1..turns questions: it
    may come first too)."""
    unanswerable = example["type"] == "unanswerable"
    history = []
    for _ in range(rng.randint(0 if unanswerable else 1, turns - 1)):
        if rng.random() < 0.2:
            q = unanswerable_question(rng, worlds[0], worlds[0], 1, split, foreign_share=1.0)
        else:
            q = rng.choice(worlds).question(rng, rng.choice(hops_choices))
        history += [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answers"][0], "trained": False}]
    example["messages"] = history + example["messages"]
    if not unanswerable:
        example["type"] = f"turn {len(history) // 2 + 1}"
    return example


class _WorldQATask(Task):
    @property
    def eval_type(self):
        return "generative"

    def evaluate(self, conversation, completion):
        return exact_match(answer_text(completion), conversation["answers"])

    def reward(self, conversation, completion):
        return qa_reward(completion, conversation["answers"])


class WorldQA(_WorldQATask):
    """Questions about one fixed world (its KB is world.documents()): training world for
    RAG over a fixed KB, held-out world for evaluation."""

    def __init__(self, world, hops=1, num_examples=1000, seed=0, turns=1, unanswerable=None, comparisons=False, **kwargs):
        super().__init__(**kwargs)
        self.world, self.hops, self.n, self.seed = world, hops, num_examples, seed
        self.turns = turns                 # > 1: conversations of 2..turns questions, this one last (with_history)
        self.unanswerable = unanswerable   # another world: questions about its entities, which this KB lacks
        self.comparisons = comparisons     # only comparisons ("Which was founded first, A or B?")

    def num_examples(self):
        return self.n

    def get_example(self, index):
        rng = random.Random(f"q-{self.seed}-{self.hops}-{index}")
        if self.unanswerable is not None:
            example = _conversation(unanswerable_question(rng, self.world, self.unanswerable, self.hops, "heldout"))
        else:
            example = _conversation(self.world.question(rng, self.hops, comparison=self.comparisons))
        if self.turns > 1:
            rng = random.Random(f"history-{self.seed}-{self.hops}-{index}")
            example = with_history(example, rng, [self.world, self.unanswerable or self.world], self.turns, "heldout")
        return example


class WorldStream(_WorldQATask):
    """Every example is a question about its own freshly generated mini-world, whose
    articles travel with it as example["kb"] (retrieve from them, e.g. RAGTask(.., "bm25")).
    Deterministic per (seed, index); names always come from the training pool."""

    def __init__(self, hops=1, rigid=False, num_examples=100_000, seed=0, turns=1, unanswerable=False, comparisons=False, **kwargs):
        super().__init__(**kwargs)
        self.hops, self.rigid, self.n, self.seed = hops, rigid, num_examples, seed
        self.turns, self.unanswerable = turns, unanswerable   # as in WorldQA; unanswerable: about another mini-world
        self.comparisons = comparisons

    def num_examples(self):
        return self.n

    def get_example(self, index):
        rng = random.Random(f"stream-{self.seed}-{index}")
        world = mini_world(rng, "train", self.rigid)
        if self.unanswerable:
            other = mini_world(random.Random(f"stream-other-{self.seed}-{index}"), "train", self.rigid)
            example = _conversation(unanswerable_question(rng, world, other, self.hops, "train"), kb=world.documents())
        else:
            example = _conversation(world.question(rng, self.hops, comparison=self.comparisons), kb=world.documents())
        if self.turns > 1:
            rng = random.Random(f"stream-history-{self.seed}-{index}")
            other = mini_world(rng, "train", self.rigid)
            example = with_history(example, rng, [world, other], self.turns, "train")
        return example


# -----------------------------------------------------------------------------
# Plain-text pretraining documents

def pretraining_documents(seed=0):
    """Endless plain-text documents for base pretraining, training names only, no special tokens.
    Most are reading drills: a few articles, then many questions whose answers are only in those
    articles, so a large share of the loss can only be lowered by looking facts up in context
    (with whole mini-worlds only, reading never emerged in a 15-minute CPU run: the answers were
    ~2% of the tokens). The rest are whole mini-worlds with fewer questions."""
    rng = random.Random(f"pretrain-{seed}")
    while True:
        rigid = rng.random() < 0.3
        if rng.random() < 0.75:
            world = make_world(rng.getrandbits(64), "train", people=rng.randint(2, 4), cities=rng.randint(2, 3),
                               orgs=2, works=2, countries=rng.randint(1, 2), rigid=rigid)
            docs = world.documents()
            rng.shuffle(docs)
            docs = docs[:rng.choice([1, 2, 3, 4, len(docs)])]
            want, hop_choices = rng.randint(6, 12), [1, 1, 1, 2]
        else:
            world = mini_world(rng, "train", rigid=rigid)
            docs = world.documents()
            rng.shuffle(docs)
            want, hop_choices = rng.randint(4, 10), [1, 1, 1, 2, 2, 3]
        shown = {d["id"] for d in docs}
        qa, facts = [], set()
        for _ in range(50 * want):   # questions whose every hop is an article shown above, each fact once
            q = world.question(rng, rng.choice(hop_choices))
            fact = (tuple(q["hops"]), q["answers"][0])
            if set(q["hops"]) <= shown and fact not in facts:   # (a repeated fact could be copied from its first answer)
                qa.append(q)
                facts.add(fact)
                if len(qa) == want:
                    break
        lines = [f"{d['title']}\n{d['text']}" for d in docs]
        lines.append("\n".join(f"Q: {q['question']}\nA: {q['answers'][0]}" for q in qa))
        yield "\n\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the knowledge worlds' KB inputs and QA files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rigid", action="store_true", help="one article template and one phrasing per question")
    parser.add_argument("--num-questions", type=int, default=500, help="questions per QA file")
    parser.add_argument("--realm", action="store_true",
                        help="also write realm/: the training world's quizzes as parquet text (last shard: quizzes about "
                             "held-out entities) for base_train --data, over the KB of train_kb.jsonl")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, world in [("train", training_world(args.seed, args.rigid)), ("heldout", heldout_world(args.seed, args.rigid))]:
        world.write_kb_input(os.path.join(args.out, f"{name}_kb.jsonl"))
        for hops in (1, 2, 3):
            world.write_qa(os.path.join(args.out, f"{name}_qa_{hops}hop.jsonl"), args.num_questions, hops, args.seed)
        world.write_qa(os.path.join(args.out, f"{name}_qa_descriptive.jsonl"), args.num_questions, seed=args.seed,
                       descriptive=True)
        print(f"{name}: {len(world.documents())} articles -> {args.out}/{name}_kb.jsonl, "
              f"{name}_qa_{{1,2,3}}hop.jsonl, {name}_qa_descriptive.jsonl")
    if args.realm:
        import pyarrow as pa
        import pyarrow.parquet as pq
        train, heldout = quiz_corpus(training_world(args.seed, args.rigid), args.seed)
        os.makedirs(os.path.join(args.out, "realm"), exist_ok=True)
        for i, texts in enumerate((train, heldout)):   # the last shard is the validation split
            pq.write_table(pa.table({"text": texts}), os.path.join(args.out, "realm", f"shard_{i:05d}.parquet"))
        print(f"realm: {len(train):,} training and {len(heldout):,} held-out quizzes -> {args.out}/realm/ "
              f"(python -m kb_tools.build_kb --input {args.out}/train_kb.jsonl --out KB; "
              f"base_train --data {args.out}/realm --retrieval-augment 3 --kb KB)")

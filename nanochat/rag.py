"""
Scoring answers that were written with retrieval. One implementation, used by the tasks
(evaluate / reward), by RL and by chat_eval, so a number means the same thing everywhere.

A completion is either a plain string or a list of assistant parts, the format
render_conversation knows: {"type": "text"|"search"|"search_results"|"python"|"python_output", ...}.
The final answer is the text written after the last search (its results included): text the
model wrote before or between searches is thinking out loud, not the answer.
"""
import re
import string
from collections import Counter

# SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_CITATION = re.compile(r"\[(\d+)\]")

MAX_QUERY_WORDS = 32   # a "search" longer than this is the model rambling, not a query
# What the model answers when the documents it was shown do not hold the answer (trained on questions
# about things the KB lacks); chat_eval counts it as an abstention, not as a wrong answer.
ABSTAIN = "The documents do not say."


def abstained(answer):
    return normalize_answer(answer) == normalize_answer(ABSTAIN)


def normalize_answer(s):
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction, answers):
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction, answers):
    """Best token-level F1 between the prediction and any gold answer (SQuAD style)."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold_tokens = normalize_answer(answer).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def citations(text):
    """Document numbers cited as [n] in a text, in order of first appearance."""
    seen = []
    for m in _CITATION.finditer(text):
        n = int(m.group(1))
        if n not in seen:
            seen.append(n)
    return seen


def strip_citations(text):
    return " ".join(_CITATION.sub(" ", text).split())


def _parts(completion):
    return [{"type": "text", "text": completion}] if isinstance(completion, str) else completion


def final_text(completion):
    """The text parts after the last search / search_results part, joined, citations kept."""
    parts = _parts(completion)
    last_tool = max((i for i, p in enumerate(parts) if p["type"] in ("search", "search_results")), default=-1)
    return "".join(p["text"] for p in parts[last_tool + 1:] if p["type"] == "text").strip()


def answer_text(completion):
    """The final answer as scored: final_text without its [n] citations."""
    return strip_citations(final_text(completion))


def search_queries(completion):
    return [p["text"] for p in _parts(completion) if p["type"] == "search"]


def retrieved_documents(completion):
    """Every document the searches of a completion brought back, in order (the numbering
    render_conversation gives them continues after the documents of the prompt)."""
    return [d for p in _parts(completion) if p["type"] == "search_results" for d in p["documents"]]


def gold_recall(retrieved_ids, gold_ids):
    """Fraction of the gold documents that were retrieved at least once (1.0 if there are none)."""
    gold = set(gold_ids)
    if not gold:
        return 1.0
    return len(gold & set(retrieved_ids)) / len(gold)


def well_formed_query(query):
    words = query.split()
    return 0 < len(words) <= MAX_QUERY_WORDS and "<|" not in query


def format_score(completion):
    """In [0, 1]: half for a non-empty final answer, half for every search being a real query."""
    answered = bool(answer_text(completion))
    searches_ok = all(well_formed_query(q) for q in search_queries(completion))
    return 0.5 * answered + 0.5 * searches_ok


def qa_reward(completion, answers, metric="em", format_weight=0.1):
    """Answer score (EM or token F1 of the final answer) + format_weight * format_score.
    A wrong answer earns at most format_weight whatever its form; a completion that only
    searches has no final answer, so it earns no answer score at all."""
    answer = answer_text(completion)
    score = exact_match(answer, answers) if metric == "em" else f1_score(answer, answers)
    return score + format_weight * format_score(completion)


# -----------------------------------------------------------------------------
# RAG evaluation beyond EM: text overlap, where the gold documents were shown, and why answers fail

def overlap_metrics(predictions, references):
    """Corpus BLEU-4 (sacrebleu, its default 13a tokenisation; 0-100) and mean ROUGE-L F1 (Google's
    rouge-score, stemmed; 0-1, best over each question's references) of answers against the
    reference lists. Well-kept libraries, so the numbers compare with published ones."""
    import sacrebleu
    from rouge_score import rouge_scorer
    width = max(len(r) for r in references)
    ref_streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(predictions, ref_streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]
    return {"bleu4": bleu, "rouge_l": sum(rouge) / len(rouge)}


def shown_rank_metrics(shown, gold, k):
    """Hit@1, Hit@k and MRR of the first gold document among the documents shown to the model,
    in the order they were shown (retrieval order for RAG, search order for multi-hop)."""
    ranks = []
    for ids, g in zip(shown, gold):
        first = next((i for i, d in enumerate(ids, 1) if d in set(g)), None)
        ranks.append(first)
    n = max(1, len(ranks))
    return {"hit@1": sum(r == 1 for r in ranks) / n, f"hit@{k}": sum(r is not None and r <= k for r in ranks) / n,
            "mrr": sum(1.0 / r for r in ranks if r) / n}


def documents_containing(answer, documents):
    """Ids of the documents whose text holds the answer (normalised, whole words): where a wrong
    answer was copied from, if it was copied."""
    pred = normalize_answer(answer)
    if not pred:
        return []
    found = []
    for d in documents:
        if f" {pred} " in f" {normalize_answer(d.get('title', '') + ' ' + d.get('text', ''))} " and d["id"] not in found:
            found.append(d["id"])
    return found


def error_class(answer, correct, shown_ids, gold_ids, found_in=()):
    """Why an answer is wrong (None if correct): 'no answer' (nothing written); 'abstained' (ABSTAIN,
    the model said the documents do not say: not a wrong value); 'retrieval miss' (no
    gold document was shown); else a reading miss, by where the answer came from (found_in: the shown
    documents holding it): another part of a gold document (another field of the right entry, a
    fragment of its prose), another document (an entry about something else), or none of them."""
    if correct:
        return None
    if not answer.strip():
        return "no answer"
    if abstained(answer):
        return "abstained"
    if gold_ids and not set(gold_ids) & set(shown_ids):
        return "retrieval miss"
    if set(found_in) & set(gold_ids):
        return "other part of a gold document"
    if found_in:
        return "from another document"
    return "not in the shown documents"

"""
Run the model on task examples and score what it wrote: the one loop behind SFT's periodic
held-out evaluation, RL rollouts and chat_eval.

For a RAG example (a retrieval message before the question) the model reads the documents and
answers. For a multi-hop example the prompt ends at <|assistant_start|>: the model writes its
own searches, the Engine runs them on the example's retriever and injects the documents.
"""
import torch

from nanochat.engine import Engine, RowState
from nanochat.rag import answer_text, exact_match, f1_score, search_queries, retrieved_documents, \
    gold_recall, well_formed_query, documents_containing, abstained


def without_retrieval(conversation):
    """The --no-retrieval ablation: the same question with no documents shown."""
    return dict(conversation, messages=[m for m in conversation["messages"] if m["role"] != "retrieval"])


def gold_ids(example):
    return example.get("hops") or example.get("supporting_ids") or []


def prompt_budget(model, max_tokens):
    """Tokens a prompt may take: the room the answer needs is left, so what is generated stays within
    the context the model was trained on (at least half the context for the prompt, whatever is asked)."""
    return max(model.config.sequence_len - max_tokens, model.config.sequence_len // 2)


def ensemble_prompts(tokenizer, conversation, max_tokens):
    """REPLUG-style inputs: one prompt per document of the conversation's retrieval message, each
    the same question after that document alone. Returns (prompts, documents)."""
    messages = conversation["messages"]
    at = next((i for i, m in enumerate(messages) if m["role"] == "retrieval"), None)
    if at is None or not messages[at]["documents"]:
        return [tokenizer.render_for_completion(conversation, max_tokens=max_tokens)], []
    docs = messages[at]["documents"]
    one = lambda d: {"messages": messages[:at] + [dict(messages[at], documents=[d])] + messages[at + 1:]}
    return [tokenizer.render_for_completion(one(d), max_tokens=max_tokens) for d in docs], docs


def ensemble_weights(documents, weighting="score", temperature=0.1):
    """lambda over the documents: softmax(retrieval score / temperature), or uniform."""
    if not documents:
        return [1.0]
    if weighting == "uniform" or any("score" not in d for d in documents):
        return [1.0 / len(documents)] * len(documents)
    return torch.softmax(torch.tensor([d["score"] for d in documents], dtype=torch.float64) / temperature, 0).tolist()


@torch.no_grad()
def ensemble_rows(model, tokenizer, conversations, max_tokens=64, weighting="score", temperature=0.1):
    """Greedy ensemble decoding (Engine.generate_ensemble) of each conversation over its retrieved
    documents; returns one RowState per conversation (tokens: the first document's prompt + the answer)."""
    engine = Engine(model, tokenizer)
    groups, weights = [], []
    for c in conversations:
        prompts, docs = ensemble_prompts(tokenizer, c, prompt_budget(model, max_tokens))
        groups.append(prompts)
        weights.append(ensemble_weights(docs, weighting, temperature))
    answers = [[] for _ in groups]
    for step in engine.generate_ensemble(groups, weights, max_tokens=max_tokens):
        for g, toks in enumerate(step):
            answers[g] += toks
    return [RowState(tokens=g[0] + a, mask=[0] * len(g[0]) + [1] * len(a),
                     parts=[{"type": "text", "text": tokenizer.decode_text(a)}] if a else [])
            for g, a in zip(groups, answers)]


@torch.no_grad()
def rollouts(model, tokenizer, tasks, examples, num_samples=1, temperature=0.0, top_k=None, max_tokens=64,
             seed=0, max_searches=4, retrieval=True, keep_stop=False, ensemble=None, copy_answers=False):
    """Generate num_samples completions for each example (examples[j] from tasks[j]), all in one
    Engine run. Returns one (prompt_ids, samples) per example, where each sample is a dict: row
    (RowState: tokens, mask, parts), reward, em, f1, searches, valid_searches, gold_recall, length
    (sampled tokens), answer. ensemble: {"weighting": "score"|"uniform", "temperature": t} decodes each
    RAG example greedily as a mixture over its documents (ensemble_rows) instead of reading them together.
    copy_answers: answers are copied from the documents shown (Engine)."""
    conversations = [ex if retrieval else without_retrieval(ex) for ex in examples]
    retrievers = [task.retriever_for(ex) if (retrieval and hasattr(task, "retriever_for")) else None
                  for task, ex in zip(tasks, examples)]
    if ensemble:
        assert num_samples == 1 and temperature == 0.0, "ensemble decoding is greedy, one answer per question"
        rows = ensemble_rows(model, tokenizer, conversations, max_tokens, **ensemble)
        prompts = [row.tokens[:len(row.mask) - sum(row.mask)] for row in rows]
    else:
        engine = Engine(model, tokenizer, max_searches=max_searches, copy_answers=copy_answers)
        prompts = [tokenizer.render_for_completion(c, max_tokens=prompt_budget(model, max_tokens)) for c in conversations]
        rows = engine.generate_batch(prompts, num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                     seed=seed, keep_stop=keep_stop, retrievers=retrievers,
                                     top_ks=[getattr(task, "top_k", 3) for task in tasks])
    results = []
    doc_start = tokenizer.special["<|doc_start|>"]
    for j, (task, example, conversation, prompt) in enumerate(zip(tasks, examples, conversations, prompts)):
        answers = example.get("answers") or []
        gold = gold_ids(example)
        samples = []
        for row in rows[j * num_samples:(j + 1) * num_samples]:
            parts = row.parts
            queries = search_queries(parts)
            searched = retrieved_documents(parts)
            # documents in the prompt count as shown too (RAG: retrieval happened before the question), those that fit
            in_prompt = [d for m in conversation["messages"] if m["role"] == "retrieval" for d in m["documents"]]
            if not ensemble:   # an ensemble reads every document, each in a prompt of its own
                in_prompt = in_prompt[:prompt.count(doc_start)]
            shown = [d["id"] for d in searched + in_prompt]
            answer = answer_text(parts)
            samples.append({
                "row": row,
                "reward": float(task.reward(example, parts)),
                "em": float(exact_match(answer, answers)) if answers else float(task.evaluate(example, parts)),
                "f1": float(f1_score(answer, answers)) if answers else 0.0,
                "searches": len(queries),
                "valid_searches": sum(well_formed_query(q) for q in queries),
                "gold_recall": gold_recall(shown, gold) if gold else float("nan"),
                "length": sum(row.mask[len(prompt):]),
                "answer": answer,
                "abstained": float(abstained(answer)),
                "shown": shown,
                "found_in": documents_containing(answer, searched + in_prompt),
            })
        results.append((prompt, samples))
    return results


def rollout(model, tokenizer, task, example, num_samples=1, temperature=0.0, top_k=None, max_tokens=64,
            seed=0, max_searches=4, retrieval=True, keep_stop=False):
    """rollouts for a single example: (prompt_ids, samples)."""
    return rollouts(model, tokenizer, [task], [example], num_samples, temperature, top_k, max_tokens, seed,
                    max_searches, retrieval, keep_stop)[0]


def evaluate_task(model, tokenizer, task, num_examples, max_tokens=64, retrieval=True, max_searches=4, start=0,
                  batch_size=32, ensemble=None, copy_answers=False):
    """Greedy decoding on the first num_examples examples, batch_size questions generated
    together; mean of each metric."""
    keys = ("em", "f1", "abstained", "searches", "valid_searches", "gold_recall", "length")
    totals = {k: 0.0 for k in keys}
    counted = {k: 0 for k in keys}
    n = min(num_examples, len(task) - start)
    if hasattr(task, "prefetch"):
        task.prefetch(range(start, start + n))
    was_training = model.training
    model.eval()
    records = []
    for first in range(start, start + n, batch_size):
        indices = range(first, min(first + batch_size, start + n))
        examples = [task[i] for i in indices]
        # a mixture's example is scored and searched by the task it came from
        tasks = [task.task_at(i) for i in indices] if hasattr(task, "task_at") else [task] * len(examples)
        results = rollouts(model, tokenizer, tasks, examples, 1, 0.0, None, max_tokens, 0,
                           max_searches, retrieval, ensemble=ensemble, copy_answers=copy_answers)
        for example, (_, (s,)) in zip(examples, results):
            for k in keys:
                if s[k] == s[k]:   # skip NaN (no gold documents)
                    totals[k] += s[k]
                    counted[k] += 1
            records.append({"question": next(m["content"] for m in reversed(example["messages"]) if m["role"] == "user"),
                            "answers": example.get("answers"), "answer": s["answer"], "parts": s["row"].parts, "em": s["em"],
                            "shown": s["shown"], "found_in": s["found_in"], "gold": gold_ids(example), "type": example.get("type")})
    if was_training:
        model.train()
    metrics = {k: totals[k] / counted[k] if counted[k] else float("nan") for k in keys}
    metrics["n"] = n
    return metrics, records


def improves_on(record, kept, tasks, hold):
    """Whether held-out EM `record` ({task/em: x}) may replace the `kept` model's (None: nothing kept
    yet): higher on the mean over `tasks` and no lower on any task in `hold`. The mean alone let RL
    trade a pure-M model's single-hop for abstaining (world2 -3 points, abstain3 +22 on 60 questions);
    holding every task would have refused a TTTT step worth +5 points of 2-hop over 4 abstentions."""
    if kept is None:
        return True
    gain = sum(record[f"{t}/em"] - kept[f"{t}/em"] for t in tasks)
    return gain > 0 and all(record[f"{t}/em"] >= kept[f"{t}/em"] for t in hold)


def rl_batch(samples, pad_id, device):
    """Sequences of the sampled rows as a padded batch for the policy loss. Targets are -1 on the
    prompt, on injected tool output / documents (mask 0) and on padding, so only tokens the
    policy chose carry gradient; advantages are per sequence."""
    return supervised_batch([s["row"].tokens for s in samples], [s["row"].mask for s in samples], pad_id, device)


def supervised_batch(seqs, masks, pad_id, device):
    """Token sequences and their masks as right-padded (inputs, targets): targets are the next
    token where its mask is 1, else -1 (ignored)."""
    T = max(len(t) for t in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(zip(seqs, masks)):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
        n = len(ids) - 1
        x[b, :n] = ids_t[:-1]
        y[b, :n] = torch.where(mask_t[1:] == 1, ids_t[1:], torch.full_like(ids_t[1:], -1))
    return x.to(device), y.to(device)


def policy_gradient_loss(nll, targets, advantages, num_tokens=None):
    """REINFORCE: -sum(advantage * log p(chosen token)) over the policy's own tokens, divided by
    their count (token-level normalisation; num_tokens: the count over the whole step when this
    is one of several micro-batches). nll (B, T): -log p of each target token, as
    GPT.forward(x, targets, loss_reduction="none") gives it; positions with target -1 contribute nothing."""
    valid = (targets >= 0).float()
    count = valid.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1)
    return (nll * valid * advantages[:, None]).sum() / count


def length_buckets(samples, max_rows):
    """Sample indices in groups of at most max_rows, by sequence length, so that each padded
    micro-batch wastes little on padding (a step's sequences range from ~50 to ~200 tokens)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["row"].tokens))
    return [order[k:k + max_rows] for k in range(0, len(order), max_rows)]

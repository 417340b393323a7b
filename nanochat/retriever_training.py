"""
Training the query side of a dense retriever (scripts/retriever_train.py), and what it measures.

Two objectives for the query side alone, both over frozen document embeddings (the KB's embeddings.npy):
- contrastive (DPR): InfoNCE of each question against its gold chunks, with the batch's other gold
  chunks and BM25 hard negatives as negatives.
- lsr (REPLUG-LSR): no gold labels. A frozen chat model scores each candidate document by the mean
  log-likelihood of the gold answer given (that document, the question); the retriever's
  distribution P = softmax(cosine / gamma) over the candidates is pulled toward
  Q = softmax(score / beta) by KL(Q || P).
And RAG's joint objective (scripts/chat_sft.py --marginalize): the generator and the query encoder
trained together on the answer's likelihood marginalised over the retrieved documents.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.retrieval.evaluate import query_metrics
from nanochat.rollout import supervised_batch


# -----------------------------------------------------------------------------
# The trainable encoder

def embed(encoder, texts, device):
    """L2-normalised sentence embeddings (B, D) that carry gradient into the encoder."""
    prepare = getattr(encoder, "preprocess", None) or encoder.tokenize   # renamed in sentence-transformers 5
    features = prepare(list(texts))
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return F.normalize(encoder(features)["sentence_embedding"], dim=-1)


def trainable_query_side(kb, device, start="base"):
    """(encoder, doc_emb) for training a dense KB's query side: a private, trainable copy of the
    query encoder (start "base": the model the documents were embedded with; "tuned": the KB's
    trained encoder when it has one) and the frozen document embeddings as a (N, D) tensor.
    kb: a RetrievalManager opened with retriever="dense"."""
    from nanochat.retrieval.dense import resolve_model
    from nanochat.retrieval.query_encoder import load_encoder, encoder_path
    tuned = encoder_path(kb.kb_dir, kb.kb.manifest) if start == "tuned" else None
    encoder = load_encoder(tuned or resolve_model(kb.kb.manifest["dense"]["model"])[0], device)
    # a copy: the KB's embeddings are a read-only memory map, which torch would warn about sharing
    doc_emb = torch.from_numpy(np.array(kb.retriever.embeddings, dtype=np.float32)).to(device)
    return encoder, doc_emb


@torch.no_grad()
def embed_eval(encoder, texts, device, batch_size=64):
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([embed(encoder, texts[i:i + batch_size], device) for i in range(0, len(texts), batch_size)])
    encoder.train(was_training)
    return out


# -----------------------------------------------------------------------------
# Losses

def contrastive_loss(queries, candidates, positive, temperature):
    """InfoNCE with several positives: -log(sum over positives / sum over all) of exp(cos / t).
    queries (B, D), candidates (N, D) unit vectors; positive (B, N) bool, at least one per row."""
    logits = queries @ candidates.T / temperature
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positive, -math.inf), dim=1)).mean()


def lsr_loss(retriever_cos, lm_scores, beta, gamma):
    """KL(Q || P) per question, averaged: Q = softmax(lm_scores / beta) (the LM's posterior over the
    candidates, a fixed target), P = softmax(retriever_cos / gamma). Both (B, k)."""
    q = F.softmax(lm_scores / beta, dim=-1)
    log_p = F.log_softmax(retriever_cos / gamma, dim=-1)
    return (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(-1).mean()


# -----------------------------------------------------------------------------
# The teacher: the chat model's likelihood of the answer given one document

def answer_conversation(question, answer, document):
    """Rendered as SFT renders a RAG example: the document block, the question, the answer."""
    return {"messages": [{"role": "retrieval", "documents": [document]}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def answer_token_logprobs(model, tokenizer, items, device, max_tokens=None):
    """log p of each supervised token (the answer and its end token) of each (question, answer,
    document dict) in items, teacher-forced in one padded forward that keeps the graph.
    Returns (logp, mask, hits): (N, n) with the answer's tokens in order, mask True on real
    tokens, hits True where the argmax is the token."""
    max_tokens = max_tokens or model.config.sequence_len
    rendered = [tokenizer.render_conversation(answer_conversation(*item), max_tokens=max_tokens) for item in items]
    x, y = supervised_batch([ids for ids, _ in rendered], [mask for _, mask in rendered], tokenizer.get_bos_token_id(), device)
    return supervised_token_logprobs(model, x, y)


def supervised_token_logprobs(model, x, y):
    """Teacher-forced log p of the supervised tokens (targets >= 0) of each row, gathered in
    order: (logp, mask, hits), each (rows, most supervised tokens in a row)."""
    nll, hits = model(x, y, loss_reduction="none", with_hits=True)
    supervised = y >= 0
    rank = supervised.long().cumsum(1) - 1   # position of each supervised token among its row's
    n = int(supervised.sum(1).max())
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)
    logp = torch.zeros(y.shape[0], n, device=y.device, dtype=nll.dtype)
    logp = logp.index_put((rows[supervised], rank[supervised]), -nll.view(y.shape)[supervised])
    mask = torch.zeros(y.shape[0], n, dtype=torch.bool, device=y.device)
    mask[rows[supervised], rank[supervised]] = True
    token_hits = torch.zeros_like(mask)
    token_hits[rows[supervised], rank[supervised]] = hits[supervised]
    return logp, mask, token_hits


@torch.no_grad()
def answer_scores(model, tokenizer, items, device, batch_size=32, max_tokens=None):
    """Mean log-likelihood per supervised token (the answer and its end token, the positions the
    SFT loss trains) of each (question, answer, document dict) in items, teacher-forced."""
    lengths = [len(item[0]) + len(item[1]) + len(item[2].get("text", "")) for item in items]
    order = sorted(range(len(items)), key=lambda i: lengths[i])   # little padding per batch
    scores = [0.0] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        logp, mask, _ = answer_token_logprobs(model, tokenizer, [items[i] for i in chunk], device, max_tokens)
        mean = logp.float().sum(1) / mask.sum(1).clamp_min(1)
        for i, value in zip(chunk, mean.tolist()):
            scores[i] = value
    return scores


# -----------------------------------------------------------------------------
# RAG (Lewis et al. 2020): the generator marginalised over the retriever's top-k documents

def marginal_nll(token_logp, mask, doc_logprior, mode):
    """-log p(y|x) per question. token_logp (B, K, n): log p(y_i | x, d_k, y_<i) with document k
    alone in the context; mask (B, n): the answer's real tokens; doc_logprior (B, K): log p(d_k|x).
    sequence: -logsumexp_k [log p(d_k|x) + sum_i log p(y_i|x,d_k,y_<i)] (one document explains the answer);
    token:    -sum_i logsumexp_k [log p(d_k|x) + log p(y_i|x,d_k,y_<i)] (each token may lean on another)."""
    m = mask[:, None, :].to(token_logp.dtype)
    if mode == "sequence":
        return -torch.logsumexp(doc_logprior + (token_logp * m).sum(-1), dim=1)
    if mode == "token":
        per_token = torch.logsumexp(doc_logprior[:, :, None] + token_logp, dim=1)   # (B, n)
        return -(per_token * mask.to(per_token.dtype)).sum(-1)
    raise ValueError(f"unknown marginalisation {mode!r} (sequence or token)")


def rag_loss(model, tokenizer, encoder, doc_emb, chunks, questions, answers, k, temperature, mode, device, max_tokens=None):
    """One RAG training batch. The query encoder retrieves the top-k chunks of each question by
    exact cosine over the frozen document embeddings doc_emb (N, D); p(d|x) = softmax(cosine /
    temperature) over those k; each (question, chunk) is one row, rendered as a RAG conversation
    with that document alone. Returns (loss, stats): loss = summed marginal NLL / answer tokens
    (a per-token mean, like SFT's loss), whose gradient reaches the generator and the query
    encoder; stats for logging (retriever entropy, top-1 chunks, how many questions the top-1
    document's row gets exactly right teacher-forced, answer tokens)."""
    q = embed(encoder, questions, device)
    cos = q @ doc_emb.T
    top = torch.topk(cos.detach(), k, dim=1).indices
    doc_logprior = F.log_softmax(cos.gather(1, top) / temperature, dim=1)
    items = [(question, answer, chunks[c].to_dict()) for question, answer, row in zip(questions, answers, top.tolist())
             for c in row]
    logp, mask, hits = answer_token_logprobs(model, tokenizer, items, device, max_tokens)
    B, n = len(questions), logp.shape[1]
    logp, mask, hits = logp.view(B, k, n).float(), mask.view(B, k, n), hits.view(B, k, n)
    assert bool((mask == mask[:, :1]).all()), "every document's row must supervise the same answer tokens"
    mask = mask[:, 0]
    nll = marginal_nll(logp, mask, doc_logprior, mode)
    loss = nll.sum() / mask.sum().clamp_min(1)
    p = doc_logprior.detach().exp()
    first = p.argmax(1)
    first_hits = hits[torch.arange(B, device=hits.device), first]
    stats = {"entropy": float(-(p * doc_logprior.detach()).sum(1).mean()),
             "top1": [row[i] for row, i in zip(top.tolist(), first.tolist())],
             "top1_right": int((first_hits | ~mask).all(1).sum()), "tokens": int(mask.sum())}
    return loss, stats


def realm_loss(model, encoder, doc_emb, chunks, parent_text, loader, units, k, temperature, device):
    """REALM's objective in pretraining: each unit of a NeighbourLoader (made with k = 0) is read
    after each of the k chunks the query encoder ranks highest for its query (never one of its own
    document's), one row per chunk; loss = -log sum_d p(d|query) p(sequence|d, query) over the
    sequence's tokens, per token of the batch. Returns (loss, stats)."""
    from nanochat.dataloader import from_source, flat_text
    q = embed(encoder, [u[1] for u in units], device)
    cos = q @ doc_emb.T
    ranked = torch.topk(cos.detach(), min(k + 8, cos.shape[1]), dim=1).indices.tolist()
    picked = []
    for unit, row in zip(units, ranked):
        source = flat_text(loader.source.get(unit[0]))
        keep = [c for c in row if not from_source(chunks[c], parent_text.get(chunks[c].doc_id, ""), source)][:k]
        if len(keep) < k:
            raise ValueError(f"only {len(keep)} of {k + 8} retrieved chunks are not from the sequence's own document")
        picked.append(keep)
    top = torch.tensor(picked, device=cos.device)
    doc_logprior = F.log_softmax(cos.gather(1, top) / temperature, dim=1)
    rendered = [loader.render(unit, [chunks[c]]) for unit, row in zip(units, picked) for c in row]
    x, y = supervised_batch([ids for ids, _ in rendered], [m for _, m in rendered], loader.bos, device)
    logp, mask, _ = supervised_token_logprobs(model, x, y)
    B, n = len(units), logp.shape[1]
    logp, mask = logp.view(B, k, n).float(), mask.view(B, k, n)[:, 0]
    nll = marginal_nll(logp, mask, doc_logprior, "sequence")
    p = doc_logprior.detach().exp()
    return nll.sum() / mask.sum().clamp_min(1), {"entropy": float(-(p * doc_logprior.detach()).sum(1).mean()),
                                                 "top1": [row[i] for row, i in zip(picked, p.argmax(1).tolist())],
                                                 "chunks": picked}


# -----------------------------------------------------------------------------
# Held-out evaluation with frozen document embeddings (exact search, as the flat index does)

def retrieval_metrics(query_emb, doc_emb, chunk_doc_ids, relevant, gamma, k):
    """Recall@1/5/10, MRR@10, nDCG@10 against the relevant doc ids, and the collapse monitor:
    mean entropy of P = softmax(cos / gamma) over each query's top-k chunks (near 0: the retriever
    is certain; log k: it cannot tell them apart) and the number of distinct top-1 documents, next
    to the number of distinct gold documents (a collapsed retriever returns a few documents for all)."""
    cos = query_emb @ doc_emb.T
    top = torch.topk(cos, min(100, cos.shape[1]), dim=1).indices.tolist()
    rankings = [list(dict.fromkeys(chunk_doc_ids[c] for c in row)) for row in top]   # each document at its best chunk
    per_query = [query_metrics(r, rel) for r, rel in zip(rankings, relevant)]
    out = {name: float(np.mean([m[name] for m in per_query])) for name in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")}
    top_cos = torch.topk(cos, min(k, cos.shape[1]), dim=1).values
    p = F.softmax(top_cos / gamma, dim=-1)
    out["entropy"] = float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
    out["distinct_top1"] = len({r[0] for r in rankings if r})
    out["distinct_gold"] = len({d for rel in relevant for d in rel})
    return out

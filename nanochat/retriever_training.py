"""
Training the query side of a dense retriever (scripts/retriever_train.py), and what it measures.

Two objectives, both over frozen document embeddings (the KB's embeddings.npy):
- contrastive (DPR): InfoNCE of each question against its gold chunks, with the batch's other gold
  chunks and BM25 hard negatives as negatives.
- lsr (REPLUG-LSR): no gold labels. A frozen chat model scores each candidate document by the mean
  log-likelihood of the gold answer given (that document, the question); the retriever's
  distribution P = softmax(cosine / gamma) over the candidates is pulled toward
  Q = softmax(score / beta) by KL(Q || P).
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


@torch.no_grad()
def answer_scores(model, tokenizer, items, device, batch_size=32, max_tokens=None):
    """Mean log-likelihood per supervised token (the answer and its end token, the positions the
    SFT loss trains) of each (question, answer, document dict) in items, teacher-forced."""
    max_tokens = max_tokens or model.config.sequence_len
    rendered = [tokenizer.render_conversation(answer_conversation(*item), max_tokens=max_tokens) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(rendered[i][0]))   # little padding per batch
    scores = [0.0] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x, y = supervised_batch([rendered[i][0] for i in chunk], [rendered[i][1] for i in chunk],
                                tokenizer.get_bos_token_id(), device)
        nll = model(x, y, loss_reduction="none").view(y.shape).float()
        mean_nll = nll.sum(1) / (y >= 0).sum(1).clamp_min(1)
        for i, value in zip(chunk, mean_nll.tolist()):
            scores[i] = -value
    return scores


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

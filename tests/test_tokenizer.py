"""Tokenizer: round trips, persistence, and every rule of render_conversation's mask."""
import pytest

from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS, TRUNCATION_MARKER, MIN_CUT_DOC_TOKENS


def segments(tok, ids, mask):
    """(decoded text, mask) runs, merging neighbours with the same mask."""
    runs = []
    for i, m in zip(ids, mask):
        if runs and runs[-1][1] == m:
            runs[-1][0].append(i)
        else:
            runs.append([[i], m])
    return [(tok.decode(r), m) for r, m in runs]


def test_round_trip_and_special_tokens(tokenizer):
    for text in ["hello world", "The cat sat on the mat. 2024!", "ünïcödé 😀 text\n\nnew lines\t tabs", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(SPECIAL_TOKENS) == 13
    ids = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == 13 and min(ids) >= tokenizer.get_vocab_size() - 13
    for s in SPECIAL_TOKENS:
        assert tokenizer.decode([tokenizer.encode_special(s)]) == s


def test_special_strings_in_text_are_never_special(tokenizer):
    specials = set(tokenizer.special.values())
    text = "see <|doc_start|> fake <|doc_end|> and <|search_start|>q<|search_end|> <|bos|>"
    ids = tokenizer.encode(text)
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == text


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tok"))
    loaded = Tokenizer.from_directory(str(tmp_path / "tok"))
    text = "The old king was born in the river city."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.special == tokenizer.special
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_directory(str(tmp_path / "missing"))
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer.from_directory(str(tmp_path / "tok"))


def test_plain_chat_masks(tokenizer):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sum?"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                          {"type": "python", "text": "2+3"},
                                          {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "5."}]},
    ]}
    ids, mask = tokenizer.render_conversation(conv)
    assert segments(tokenizer, ids, mask) == [
        ("<|bos|><|user_start|> Be brief.\n\nHi<|user_end|><|assistant_start|>", 0),
        (" Hello<|assistant_end|>", 1),
        ("<|user_start|> Sum?<|user_end|><|assistant_start|>", 0),
        (" It is <|python_start|> 2+3<|python_end|>", 1),
        ("<|output_start|> 5<|output_end|>", 0),
        (" 5.<|assistant_end|>", 1),
    ]


def test_retrieval_and_search_masks(tokenizer):
    docs = [{"id": "a", "title": "Cat", "text": "The cat sat."}, {"id": "b", "title": "Dog", "text": "The dog ran."}]
    conv = {"messages": [
        {"role": "retrieval", "documents": docs},
        {"role": "user", "content": "Who sat?"},
        {"role": "assistant", "content": [
            {"type": "search", "text": "cat sat"},
            {"type": "search_results", "documents": [{"id": "c", "title": "Mat", "text": "On the mat."}]},
            {"type": "text", "text": "The cat [1]."},
        ]},
    ]}
    ids, mask = tokenizer.render_conversation(conv)
    assert segments(tokenizer, ids, mask) == [
        ("<|bos|><|doc_start|>[1] Cat\n The cat sat.<|doc_end|><|doc_start|>[2] Dog\n The dog ran.<|doc_end|>"
         "<|user_start|> Who sat?<|user_end|><|assistant_start|>", 0),
        ("<|search_start|> cat sat<|search_end|>", 1),
        ("<|doc_start|>[3] Mat\n On the mat.<|doc_end|>", 0),
        (" The cat [1].<|assistant_end|>", 1),
    ]
    # token by token: everything between doc markers is mask 0
    inside = False
    for i, m in zip(ids, mask):
        if i == tokenizer.special["<|doc_start|>"]:
            inside = True
        if inside:
            assert m == 0
        if i == tokenizer.special["<|doc_end|>"]:
            inside = False


def test_a_name_is_the_same_tokens_in_documents_questions_and_answers(tokenizer):
    # the leading space of every text piece: copying a name is copying tokens, not re-spelling it
    name = tokenizer.encode(" Lerazul")
    conv = {"messages": [
        {"role": "retrieval", "documents": [{"id": "a", "title": "Kobo", "text": "Lerazul is a city in Lerazul."}]},
        {"role": "user", "content": "Lerazul?"},
        {"role": "assistant", "content": [{"type": "search", "text": "Lerazul"}, {"type": "text", "text": "Lerazul"}]},
    ]}
    ids, _ = tokenizer.render_conversation(conv)
    starts = [k for k in range(len(ids)) if ids[k:k + len(name)] == name]
    assert len(starts) == 5   # document text twice, question, search, answer
    assert tokenizer.decode_text(tokenizer.encode_text("Lerazul")) == "Lerazul"


def test_structure_errors(tokenizer):
    with pytest.raises(ValueError, match="retrieval"):
        tokenizer.render_conversation({"messages": [
            {"role": "user", "content": "q"}, {"role": "retrieval", "documents": []},
            {"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match="should be from 'user'"):
        tokenizer.render_conversation({"messages": [{"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match="unknown assistant part"):
        tokenizer.render_conversation({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}]})


def test_document_cap_and_conversation_cap(tokenizer):
    long_text = "the river city " * 200
    conv = {"messages": [
        {"role": "retrieval", "documents": [{"id": "x", "title": "Long", "text": long_text},
                                            {"id": "y", "title": "Long2", "text": long_text}]},
        {"role": "user", "content": "Where was the old king born?"},
        {"role": "assistant", "content": "In the city."},
    ]}
    start, end = tokenizer.special["<|doc_start|>"], tokenizer.special["<|doc_end|>"]
    bodies = lambda ids: [ids.index(end, i) - i - 1 for i, t in enumerate(ids) if t == start]
    ids, mask = tokenizer.render_conversation(conv, max_tokens=100_000, max_doc_tokens=40)
    assert tokenizer.decode(ids).count(TRUNCATION_MARKER) == 2 and bodies(ids) == [40, 40]   # each body at most 40 tokens
    full, full_mask = tokenizer.render_conversation(conv, max_tokens=100_000)
    assert TRUNCATION_MARKER not in tokenizer.decode(full)   # no cap unless asked: the budget rules
    doc_len, doc2_len = bodies(full)
    fixed = len(full) - (doc_len + 2) - (doc2_len + 2)
    # a budget for one whole document and part of the next: the first whole, the second cut to the room left
    capped, capped_mask = tokenizer.render_conversation(conv, max_tokens=fixed + doc_len + 2 + 50)
    assert bodies(capped) == [doc_len, 48] and len(capped) == fixed + doc_len + 2 + 50
    text = tokenizer.decode(capped)
    assert text.count(TRUNCATION_MARKER) == 1 and "[2] Long2" in text
    assert "Where was the old king born?" in text and text.endswith("In the city.<|assistant_end|>")
    assert sum(capped_mask) == sum(full_mask)
    # too little room left for a useful piece of the second (< MIN_CUT_DOC_TOKENS): it is dropped, not cut
    capped, _ = tokenizer.render_conversation(conv, max_tokens=fixed + doc_len + 2 + MIN_CUT_DOC_TOKENS)
    assert bodies(capped) == [doc_len] and "Long2" not in tokenizer.decode(capped)
    # room for part of the first only: it is cut and the second never shown
    capped, _ = tokenizer.render_conversation(conv, max_tokens=fixed + 100)
    assert bodies(capped) == [98]
    # a prompt too long even without documents keeps its question (the oldest tokens go)
    prompt = tokenizer.render_for_completion(conv, max_tokens=12)
    assert len(prompt) == 12 and prompt[0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(prompt).endswith("born?<|user_end|><|assistant_start|>")


def test_render_for_completion(tokenizer):
    conv = {"messages": [
        {"role": "retrieval", "documents": [{"id": "a", "title": "Cat", "text": "The cat sat."}]},
        {"role": "user", "content": "Who sat?"},
        {"role": "assistant", "content": "The cat."},
    ]}
    ids = tokenizer.render_for_completion(conv)
    assert ids[-1] == tokenizer.special["<|assistant_start|>"]
    text = tokenizer.decode(ids)
    assert "The cat sat." in text and "The cat.<|assistant_end|>" not in text


def test_long_chat_keeps_the_latest_question(tokenizer):
    from nanochat.chat import fit_prompt
    messages = []
    for k in range(20):
        messages += [{"role": "user", "content": f"old question {k} " + "the cat sat " * 5},
                     {"role": "assistant", "content": "the dog ran " * 5}]
    messages.append({"role": "user", "content": "Where was the king born?"})
    prompt = fit_prompt(tokenizer, {"messages": messages}, 64)
    text = tokenizer.decode(prompt)
    assert len(prompt) <= 64
    assert text.startswith("<|bos|>") and text.endswith("Where was the king born?<|user_end|><|assistant_start|>")
    assert "old question 0" not in text


def test_fingerprint_survives_save_and_load_and_tells_vocabularies_apart(tokenizer, tmp_path):
    from nanochat.tokenizer import Tokenizer
    tokenizer.save(str(tmp_path / "tok"))
    again = Tokenizer.from_directory(str(tmp_path / "tok"))
    assert again.fingerprint() == tokenizer.fingerprint() and len(tokenizer.fingerprint()) == 16
    other = Tokenizer.train_from_iterator(iter(["a completely different corpus of words " * 50]), 300)
    assert other.fingerprint() != tokenizer.fingerprint()


@pytest.mark.parametrize("position", ["after", "before", "both"])
def test_reading_order(tokenizer, position):
    """The question after the documents, before them, or both (JRT); the same tokens are supervised,
    a model's own searches keep their results after them, and a bad value is refused."""
    conv = {"messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
        {"role": "retrieval", "documents": [{"id": "a", "title": "Cat", "text": "The cat sat."},
                                            {"id": "b", "title": "Dog", "text": "The dog ran."}]},
        {"role": "user", "content": "Who sat?"},
        {"role": "assistant", "content": [{"type": "search", "text": "cat"},
                                          {"type": "search_results", "documents": [{"id": "c", "title": "", "text": "Mat."}]},
                                          {"type": "text", "text": "The cat."}]},
    ]}
    tokenizer.query_position = "after"
    ref_ids, ref_mask = tokenizer.render_conversation(conv)
    tokenizer.query_position = position
    try:
        ids, mask = tokenizer.render_conversation(conv)
        prompt = tokenizer.render_for_completion({"messages": conv["messages"][:-1]})
    finally:
        tokenizer.query_position = "after"
    text = tokenizer.decode(ids)
    question = "<|user_start|> Who sat?<|user_end|>"
    docs = "<|doc_start|>[1] Cat\n The cat sat.<|doc_end|><|doc_start|>[2] Dog\n The dog ran.<|doc_end|>"
    expected = {"after": docs + question, "before": question + docs, "both": question + docs + question}[position]
    assert "<|user_start|> Hello<|user_end|><|assistant_start|> Hi.<|assistant_end|>" + expected + "<|assistant_start|>" in text
    assert text.count("Who sat?") == (2 if position == "both" else 1)
    assert [t for t, m in zip(ids, mask) if m] == [t for t, m in zip(ref_ids, ref_mask) if m]   # masks do not change
    assert all(m == 0 for t, m in zip(ids, mask) if t in (tokenizer.special["<|doc_start|>"], tokenizer.special["<|user_start|>"]))
    assert "<|search_end|><|doc_start|>[3]\n Mat.<|doc_end|>" in text       # search results stay after the search
    assert tokenizer.decode(prompt).endswith(expected + "<|assistant_start|>")
    tokenizer.query_position = "sideways"
    try:
        with pytest.raises(ValueError, match="query_position"):
            tokenizer.render_conversation(conv)
    finally:
        tokenizer.query_position = "after"


def test_chat_history_goes_before_documents(tokenizer):
    """What a chat sends when it does not fit: the oldest turns go first, then the documents of the
    latest question are fitted to what is left (fit_documents), and the question itself stays."""
    from nanochat.chat import fit_prompt
    doc = {"id": "d", "title": "King", "text": "The old king was born in the river city. " * 6}
    messages = []
    for k in range(6):
        messages += [{"role": "user", "content": f"old question {k} about cats"}, {"role": "assistant", "content": f"answer {k}"}]
    messages += [{"role": "retrieval", "documents": [doc, dict(doc, id="e", title="Queen")]},
                 {"role": "user", "content": "Where was the king born?"}]
    full = tokenizer.render_for_completion({"messages": messages}, max_tokens=10 ** 6)
    latest = tokenizer.render_for_completion({"messages": messages[-2:]}, max_tokens=10 ** 6)
    for budget in (len(full), len(full) - 10, len(latest), len(latest) - 40):
        text = tokenizer.decode(fit_prompt(tokenizer, {"messages": messages}, budget))
        assert len(fit_prompt(tokenizer, {"messages": messages}, budget)) <= budget
        assert text.endswith("Where was the king born?<|user_end|><|assistant_start|>")
        kept = [k for k in range(6) if f"old question {k}" in text]
        assert kept == list(range(6 - len(kept), 6))   # the newest turns are kept, the oldest dropped
        if budget < len(full):
            assert "old question 0" not in text
        if budget >= len(latest):
            assert text.count("[1] King") == 1 and "[2] Queen" in text   # history went before any document was cut
        else:
            # then the documents, from the last: the second is cut, the first stays whole
            assert not kept and text.count(TRUNCATION_MARKER) == 1 and text.index(TRUNCATION_MARKER) > text.index("[2] Queen")

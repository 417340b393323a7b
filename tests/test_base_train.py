"""End to end on tiny data: tok_train -> base_train (loss falls, checkpoint loads with
weights_only=True, exact resume), torchrun with 2 CPU processes, and one-line errors."""
import os
import re

import pytest
import torch

from tests.conftest import run_module, TINY_MODEL as TINY


def step_losses(output):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step +(\d+)/\d+ \| loss ([\d.]+)", output)}


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def base_dir(trained_base):
    return trained_base


def test_pretrain_loss_falls_and_checkpoint_is_tensors_only(base_dir, parquet_dir):
    out = check(run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--num-iterations", "40",
                           "--save-every", "20", "--model-tag", "t1", base_dir=base_dir))
    losses = step_losses(out)
    assert losses[40] < losses[1] - 1.0, losses
    ckpt = os.path.join(base_dir, "base_checkpoints", "t1")
    state = torch.load(os.path.join(ckpt, "model_000040.pt"), weights_only=True)
    assert "lm_head.weight" in state
    for rank_file in ("optim_000040_rank0.pt", "optim_000020_rank0.pt"):
        torch.load(os.path.join(ckpt, rank_file), weights_only=True)
    # resume from step 20: the next steps' losses are identical to the uninterrupted run
    out2 = check(run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--num-iterations", "40",
                            "--save-every", "20", "--model-tag", "t1", "--resume-from-step", "20", base_dir=base_dir))
    resumed = step_losses(out2)
    assert min(resumed) == 21
    for s in (21, 22, 23, 30, 40):
        assert resumed[s] == pytest.approx(losses[s], abs=2e-4), (s, resumed[s], losses[s])


def test_seed_is_a_replicate(base_dir, parquet_dir):
    # --seed 0 is the default run; another seed starts from other weights and other documents
    runs = {}
    for seed in (None, "0", "1"):
        extra = ("--seed", seed) if seed else ()
        out = check(run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--num-iterations", "3",
                               "--model-tag", f"seed{seed}", *extra, base_dir=base_dir))
        runs[seed] = step_losses(out)
    assert runs[None] == runs["0"]
    assert runs["1"][1] != runs["0"][1]


def test_torchrun_two_cpu_processes(base_dir, parquet_dir):
    out = check(run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--num-iterations", "20",
                           "--device-batch-size", "2", "--model-tag", "ddp", base_dir=base_dir, torchrun_procs=2))
    losses = step_losses(out)
    assert len(losses) == 20 and losses[20] < losses[1] - 1.0   # printed once (rank 0 only), and it learned
    assert os.path.exists(os.path.join(base_dir, "base_checkpoints", "ddp", "optim_000020_rank1.pt"))


def test_chat_cli_prompt_on_base_model(base_dir):
    out = check(run_module("scripts.chat_cli", "--source", "base", "--model-tag", "tiny", "-p", "the cat",
                           "--max-tokens", "8", base_dir=base_dir))
    assert out.strip()


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_bad_input_errors(base_dir, parquet_dir, tmp_path):
    p = run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--block-pattern", "TX", base_dir=base_dir)
    one_line_error(p, "--block-pattern")
    p = run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--block-pattern", "TTT", base_dir=base_dir)
    one_line_error(p, "--block-pattern", "3 letters")
    p = run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--depth", "0", base_dir=base_dir)
    one_line_error(p, "--depth")
    p = run_module("scripts.base_train", *TINY, "--data", "nonsense", base_dir=base_dir)
    one_line_error(p, "--data")
    p = run_module("scripts.base_train", *TINY, "--data", "embedded:x+realtext", base_dir=base_dir)
    one_line_error(p, "--data", "not a number")
    p = run_module("scripts.base_train", *TINY, "--data", parquet_dir, "--resume-from-step", "999", "--model-tag", "t1",
                   base_dir=base_dir)
    one_line_error(p, "step 999")
    p = run_module("scripts.chat_cli", "--source", "sft", "-p", "hi", base_dir=str(tmp_path))   # an empty base dir: other test files add SFT checkpoints to the shared one
    one_line_error(p, "no sft checkpoints")
    # a truncated checkpoint file
    ckpt = os.path.join(base_dir, "base_checkpoints", "broken")
    os.makedirs(ckpt, exist_ok=True)
    src = os.path.join(base_dir, "base_checkpoints", "tiny")
    for f in os.listdir(src):
        data = open(os.path.join(src, f), "rb").read()
        open(os.path.join(ckpt, f), "wb").write(data[: len(data) // 2] if f.startswith("model_") else data)
    p = run_module("scripts.chat_cli", "--source", "base", "--model-tag", "broken", "-p", "hi", base_dir=base_dir)
    one_line_error(p, "corrupt or truncated")
    # an empty corpus
    import pyarrow as pa
    import pyarrow.parquet as pq
    empty = tmp_path / "empty"
    empty.mkdir()
    for s in range(2):
        pq.write_table(pa.table({"text": ["", ""]}), str(empty / f"shard_{s}.parquet"))
    p = run_module("scripts.tok_train", "--data", str(empty), base_dir=tmp_path / "nc")
    one_line_error(p, "empty")
    p = run_module("scripts.tok_train", "--data", str(tmp_path / "nope"), base_dir=tmp_path / "nc")
    one_line_error(p, "nope")


def test_realtext_mix_end_to_end(tmp_path):
    """--data embedded+realtext through tok_train (with its tokens-per-word report) and base_train, the
    real text read only under $NANOCHAT_REALTEXT_ROOTS."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(300):   # enough files for a validation split (1 in 50: mod_200 and mod_266)
        (corpus / f"mod_{k}.py").write_text(f'"""Module {k} reads the input file and counts the lines that were found '
                                            f'in it, which is what the report at the end of the run shows."""\n')
    env = {"NANOCHAT_REALTEXT_ROOTS": str(corpus)}
    base = tmp_path / "nc"
    out = check(run_module("scripts.tok_train", "--data", "embedded+realtext", "--vocab-size", "400",
                           "--max-chars", "200000", base_dir=base, extra_env=env))
    assert "tokens per word on realtext val" in out and "tokens per word on embedded val" in out
    import json
    report = json.load(open(base / "tokenizer" / "report.json"))
    assert report["data"] == "embedded+realtext" and set(report["tokens_per_word"]) == {"embedded", "realtext"}
    out = check(run_module("scripts.base_train", *TINY, "--data", "embedded:3+realtext:1", "--num-iterations", "4",
                           "--model-tag", "mix", base_dir=base, extra_env=env))
    assert sorted(step_losses(out)) == [1, 2, 3, 4]


@pytest.mark.parametrize("pattern", ["TTTT", "MMMM", "TMTM"])
def test_each_block_pattern_learns(pattern):
    """A tiny model of each pattern fits a repeating sequence: loss falls clearly."""
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.optim import setup_optimizers
    torch.manual_seed(0)
    config = config_from_depth(4, 64, 32, aspect_ratio=16, head_dim=16, block_pattern=pattern,
                               mamba_d_state=16, mamba_headdim=16, mamba_chunk_size=16)
    model = GPT(config)
    model.init_weights()
    optimizers = setup_optimizers(model)
    x = torch.randint(0, 64, (4, 8)).repeat(1, 4)   # period-8 sequences: learnable only by copying
    first = None
    for _ in range(60):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        first = first or loss.item()
    assert loss.item() < 0.5 * first, (pattern, first, loss.item())


def test_hybrid_pattern_pretrain_then_chat(base_dir, parquet_dir):
    out = check(run_module("scripts.base_train", *TINY, "--depth", "4", "--block-pattern", "MMTT", "--data", parquet_dir,
                           "--num-iterations", "8", base_dir=base_dir))
    assert "pattern MMTT" in out
    meta = os.path.join(base_dir, "base_checkpoints", "d4_MMTT", "meta_000008.json")
    import json
    assert json.load(open(meta))["model_config"]["block_pattern"] == "MMTT"
    out = check(run_module("scripts.chat_cli", "--source", "base", "--model-tag", "d4_MMTT", "-p", "the king",
                           "--max-tokens", "8", base_dir=base_dir))
    assert out.strip()


def test_mamba_init_is_saved_and_old_checkpoints_load_as_default(base_dir, parquet_dir):
    import json
    from nanochat.checkpoint_manager import load_checkpoint, build_model
    # (and the recall drills as pretraining data, mixed with the knowledge world)
    check(run_module("scripts.base_train", *TINY, "--block-pattern", "MM", "--mamba-init", "mimetic",
                     "--data", "embedded:1+recall:1", "--num-iterations", "2", "--model-tag", "mimetic", base_dir=base_dir))
    ckpt = os.path.join(base_dir, "base_checkpoints", "mimetic")
    state, _, meta = load_checkpoint(ckpt, 2, "cpu")
    assert meta["model_config"]["mamba_init"] == "mimetic"
    model = build_model(meta["model_config"], state, "cpu")
    assert model.config.to_dict() == meta["model_config"]   # round-trips
    assert torch.equal(model.state_dict()["transformer.h.0.mixer.A_log"], state["transformer.h.0.mixer.A_log"])
    # a checkpoint from before the option has no key: it loads, as the default init
    old = {k: v for k, v in meta["model_config"].items() if k != "mamba_init"}
    assert build_model(old, state, "cpu").config.mamba_init == "default"
    assert json.load(open(os.path.join(ckpt, "meta_000002.json")))["user_config"]["mamba_init"] == "mimetic"


def test_tied_embeddings_stay_one_matrix_through_checkpoints_and_the_optimizer():
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.checkpoint_manager import build_model
    from nanochat.optim import setup_optimizers
    config = config_from_depth(2, 128, 32, 32, 32, "TM", tie_embeddings=True)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    loaded = build_model(config.to_dict(), model.state_dict(), "cpu")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    adamw = setup_optimizers(loaded)[0]
    params = [p for g in adamw.param_groups for p in g["params"]]
    assert sum(p is loaded.lm_head.weight for p in params) == 1
    # one step moves the shared matrix once, and both uses see it
    loaded.train()
    idx = torch.randint(0, 128, (2, 16))
    loaded(idx, idx).backward()
    before = loaded.transformer.wte.weight.detach().clone()
    adamw.step()
    assert not torch.equal(before, loaded.lm_head.weight.detach())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_muon_batched_step_equals_one_matrix_at_a_time():
    """Muon orthogonalises same-shaped matrices (a tall one as its transpose) in one batched
    Newton-Schulz; every matrix gets the update it would get alone, momentum included."""
    from nanochat.optim import Muon, zeropower_via_newtonschulz5
    torch.manual_seed(0)
    shapes = [(128, 128), (512, 128), (128, 512), (128, 128), (96, 40)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    params[-1]._muon_splits = [32, 32, 32]
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.1, momentum=0.9)
    grads = [[torch.randn(*s) for s in shapes] for _ in range(2)]
    bufs = [torch.zeros(*s) for s in shapes]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for k, (p, w) in enumerate(zip(params, before)):
        for step_grads in grads:   # the same two steps, one matrix alone
            bufs[k].lerp_(step_grads[k], 0.1)
            g = step_grads[k].lerp(bufs[k], 0.9)
            parts = g.split(p._muon_splits) if hasattr(p, "_muon_splits") else [g]
            w = w - 0.1 * torch.cat([zeropower_via_newtonschulz5(q) * max(1.0, q.size(0) / q.size(1)) ** 0.5 for q in parts])
        assert torch.allclose(p.detach(), w, atol=1e-5), shapes[k]


def test_reading_probe_is_reported_and_saved(base_dir):
    import json
    args = [a for a in TINY if a not in ("--max-seq-len", "64")]
    out = check(run_module("scripts.base_train", *args, "--max-seq-len", "512", "--data", "embedded",
                           "--num-iterations", "2", "--model-tag", "probe", base_dir=base_dir))
    assert re.search(r"reading EM \d\.\d\d \(names and years \d\.\d\d, common words \d\.\d\d\)", out)
    meta = json.load(open(os.path.join(base_dir, "base_checkpoints", "probe", "meta_000002.json")))
    assert set(meta["reading_em"]) == {"all", "name or year", "common word"}
    assert all(0.0 <= v <= 1.0 for v in meta["reading_em"].values())

"""chat_rl --keep-best: RL that cannot improve the model (a learning rate 500x the recipe's, on a model
that answers nothing right) ends with the starting model unchanged, and says so; --no-keep-best saves
the last step."""
import json
import os

import torch

from tests.conftest import run_module


def test_rl_that_cannot_improve_keeps_the_starting_model(trained_base):
    sft = run_module("scripts.chat_sft", "--model-tag", "tiny", "--num-iterations", "2", "--device-batch-size", "2",
                     "--eval-every", "0", "--eval-examples", "2", "--curriculum", "world1", "--no-compile", base_dir=trained_base)
    assert sft.returncode == 0, sft.stderr[-3000:]
    sft_dir = os.path.join(trained_base, "chatsft_checkpoints", "tiny")
    # what chat_rl starts from: the SFT directory's last step (another test may have written a later one)
    last_sft = max(n for n in os.listdir(sft_dir) if n.startswith("model_"))
    start = torch.load(os.path.join(sft_dir, last_sft), weights_only=True)
    rl_dir = os.path.join(trained_base, "chatrl_checkpoints", "tiny")
    common = ["--model-tag", "tiny", "--num-iterations", "3", "--prompts-per-step", "2", "--num-samples", "2",
              "--max-new-tokens", "8", "--eval-every", "0", "--eval-examples", "4", "--eval-mixture", "world1",
              "--hold", "world1", "--lr-frac", "500", "--curriculum", "world1"]
    rl = run_module("scripts.chat_rl", *common, base_dir=trained_base)
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert "RL did not beat the sft model" in rl.stdout.strip().splitlines()[-1]
    kept = torch.load(os.path.join(rl_dir, "model_000000.pt"), weights_only=True)
    assert kept.keys() == start.keys() and all(torch.equal(kept[k], start[k]) for k in start)
    meta = json.load(open(os.path.join(rl_dir, "meta_000000.json")))
    assert meta["kept"] == "start" and meta["step"] == 0 and meta["steps_trained"] == 3
    records = [json.loads(line) for line in open(os.path.join(rl_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "world1/em" in r] == [0, 3]   # the start is evaluated, then the end
    # without the guard the last step is saved, whatever it scored
    rl = run_module("scripts.chat_rl", *common, "--no-keep-best", base_dir=trained_base)
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert "saved" in rl.stdout and "step 3 of 3" in rl.stdout.strip().splitlines()[-1]
    assert json.load(open(os.path.join(rl_dir, "meta_000003.json")))["kept"] == "last"
    assert sorted(n for n in os.listdir(rl_dir) if n.startswith("model_")) == ["model_000003.pt"]   # the older run's is gone
    # a held task the evaluation never measures is a mistake, named before any training
    bad = run_module("scripts.chat_rl", *common, "--hold", "world1,world3", base_dir=trained_base)
    assert bad.returncode != 0 and "--hold world1,world3" in bad.stderr and "Traceback" not in bad.stderr


def test_a_step_replaces_the_kept_model_only_if_better_and_no_held_task_is_lower():
    from nanochat.rollout import improves_on
    tasks, hold = ["world2", "world3", "abstain3"], ["world2", "world3"]
    kept = {"world2/em": 0.633, "world3/em": 0.45, "abstain3/em": 0.767}
    assert improves_on(kept, None, tasks, hold)                                    # the start is always kept first
    # higher mean, single-hop lower: refused (a pure-M run's RL step traded world2 for abstaining)
    assert not improves_on({"world2/em": 0.60, "world3/em": 0.467, "abstain3/em": 0.983}, kept, tasks, hold)
    assert improves_on({"world2/em": 0.60, "world3/em": 0.467, "abstain3/em": 0.983}, kept, tasks, [])  # mean alone
    # better answers, fewer abstentions, higher mean: accepted (a held task may not fall, the others may)
    assert improves_on({"world2/em": 0.65, "world3/em": 0.55, "abstain3/em": 0.70}, kept, tasks, hold)
    assert not improves_on({"world2/em": 0.65, "world3/em": 0.46, "abstain3/em": 0.60}, kept, tasks, hold)  # mean lower
    assert not improves_on(dict(kept), kept, tasks, hold)                          # a tie keeps the earlier model

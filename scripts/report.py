"""
Write report.md (and its plots) for a speedrun_rag.sh run directory: the configuration, time per
stage, loss curves, retrieval metrics of the held-out KB, the EM table with and without retrieval,
and sample conversations. Everything comes from files the stages already wrote:

    logs/<stage>.log, logs/<stage>.done        console output; the command and its seconds
    base_checkpoints/<tag>/meta_*.json         model config
    chatsft_checkpoints/<tag>/metrics.jsonl    held-out EM / answer loss during SFT
    chatrl_checkpoints/<tag>/metrics.jsonl     reward / EM per RL step, held-out EM
    kb/retrieval_*.json                        kb_tools.eval_retrieval --json
    eval/<sft|rl>_<task>[_noretrieval|_shuffled].json    chat_eval --json-out
    transfer/<set>[_copied].json, transfer/long/<set>_top<k>[_copied].json   the same, real-text sets

    python -m scripts.report --run-dir runs/cpu_d4 --model-tag d4

A missing file leaves its section saying so instead of failing, so the report can be rebuilt from
a partial run.
"""
import os
import re
import sys
import glob
import json
import argparse
import platform
import datetime

import matplotlib
matplotlib.use("Agg")   # no display: write PNG files
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description="Build report.md and plots from a speedrun_rag.sh run directory")
parser.add_argument("--run-dir", required=True, help="the run directory (also the run's NANOCHAT_BASE_DIR)")
parser.add_argument("--model-tag", required=True, help="checkpoint tag of the run's model, e.g. d4 or d4_TMTM")
parser.add_argument("--mode", default="cpu", help="speedrun mode (cpu | gpu | smoke), for the title")
parser.add_argument("--nproc", type=int, default=1, help="processes per training stage, for the configuration")
args = parser.parse_args()
run_dir = os.path.abspath(args.run_dir)
if not os.path.isdir(run_dir):
    sys.exit(f"error: no run directory {run_dir}")
plot_dir = os.path.join(run_dir, "report")
os.makedirs(plot_dir, exist_ok=True)
STAGES = ["data", "tokenizer", "base", "import", "sft", "rl", "kb", "eval", "transfer", "retriever", "report"]


# -----------------------------------------------------------------------------
# Reading what the stages left behind

def read_text(*parts):
    path = os.path.join(run_dir, *parts)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_json(*parts):
    text = read_text(*parts)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def read_jsonl(*parts):
    text = read_text(*parts) or ""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass   # a line cut by a kill
    return rows


def parse_log(stage, pattern):
    """(step, float, ...) tuples of every log line matching pattern (groups: step, values)."""
    text = read_text("logs", f"{stage}.log") or ""
    return [tuple(float(g) for g in m.groups()) for m in re.finditer(pattern, text, re.MULTILINE)]


def stage_done(stage):
    """(command, seconds) from logs/<stage>.done, or None if the stage has not finished."""
    text = read_text("logs", f"{stage}.done")
    if not text:
        return None
    lines = text.splitlines()
    return lines[0], int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None


def latest_meta(phase_dir):
    metas = sorted(glob.glob(os.path.join(run_dir, phase_dir, args.model_tag, "meta_*.json")))
    return read_json(os.path.relpath(metas[-1], run_dir)) if metas else None


def fmt_time(seconds):
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def clean(text):
    """Model or KB text goes inside ```text blocks: a ``` of its own would end the block early."""
    return str(text).replace("```", "'''")


def pct(x):
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


# -----------------------------------------------------------------------------
# Plots (every plot is written, with a note when its stage logged nothing yet)

def new_figure(ncols):
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    return fig, axes[0]


def no_data(ax, what):
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, name), dpi=100)
    plt.close(fig)
    return f"report/{name}"


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_tasks(rows):
    """Task names of held-out records ('world2/em' -> 'world2'), in order of appearance."""
    names = []
    for r in rows:
        for k in r:
            if k.endswith("/em") and not k.startswith("train/") and k[:-3] not in names:
                names.append(k[:-3])
    return names


TASK_LABEL = {"world1": "single-hop, 1 doc", "world2": "single-hop (docs shown)", "world3": "2-hop (model searches)",
              "world4": "3-hop (model searches)"}

# pretraining: training loss and validation bits per byte
base_loss = parse_log("base", r"^step\s+(\d+)/\d+ \| loss ([\d.]+) \(smooth ([\d.]+)\)")
base_bpb = parse_log("base", r"^step\s+(\d+) \| val bpb ([\d.]+)")
fig, (ax1, ax2) = new_figure(2)
if base_loss:
    ax1.plot([r[0] for r in base_loss], [r[1] for r in base_loss], alpha=0.3, label="loss")
    ax1.plot([r[0] for r in base_loss], [r[2] for r in base_loss], label="smoothed")
    ax1.legend()
else:
    no_data(ax1, "training loss")
ax1.set(title="pretraining loss", xlabel="step", ylabel="loss (nats/token)")
if base_bpb:
    ax2.plot([r[0] for r in base_bpb], [r[1] for r in base_bpb], marker="o")
else:
    no_data(ax2, "validation bpb")
ax2.set(title="pretraining validation", xlabel="step", ylabel="bits per byte")
plot_base = save(fig, "pretrain.png")

# SFT: training loss and batch EM (curriculum stage changes marked), then held-out EM and answer loss
sft_metrics = read_jsonl("chatsft_checkpoints", args.model_tag, "metrics.jsonl")
sft_train = [r for r in sft_metrics if "train/loss" in r]
fig, (ax1, ax2) = new_figure(2)
if sft_train:
    ax1.plot(*series(sft_train, "train/loss"))
    ax1.set_yscale("log")
    ax2.plot(*series(sft_train, "train/batch_em"))
    for prev, r in zip(sft_train, sft_train[1:]):
        if r.get("stage") != prev.get("stage"):   # the curriculum moved on
            for ax in (ax1, ax2):
                ax.axvline(r["step"], color="gray", linestyle=":")
            ax2.text(r["step"], 0.02, f" stage {r['stage']}", color="gray", fontsize=8, rotation=90, va="bottom")
else:
    no_data(ax1, "SFT loss")
    no_data(ax2, "SFT batch EM")
ax1.set(title="SFT training loss (assistant tokens)", xlabel="step", ylabel="loss")
ax2.set(title="SFT: teacher-forced EM of each training batch", xlabel="step", ylabel="EM", ylim=(-0.02, 1.02))
plot_sft_loss = save(fig, "sft_loss.png")

fig, (ax1, ax2) = new_figure(2)
for task in eval_tasks(sft_metrics):
    ax1.plot(*series(sft_metrics, f"{task}/em"), marker="o", label=TASK_LABEL.get(task, task))
    ax2.plot(*series(sft_metrics, f"{task}/answer_loss"), marker="o", label=TASK_LABEL.get(task, task))
for ax, what in ((ax1, "held-out EM"), (ax2, "held-out answer loss")):
    if ax.lines:
        ax.legend()
    else:
        no_data(ax, what)
ax1.set(title="SFT: held-out exact match", xlabel="step", ylabel="EM", ylim=(-0.02, 1.02))
ax2.set(title="SFT: held-out answer loss", xlabel="step", ylabel="loss on answer tokens")
plot_sft_heldout = save(fig, "sft_heldout.png")

# RL: reward and EM of the rollouts per step, held-out EM
rl_metrics = read_jsonl("chatrl_checkpoints", args.model_tag, "metrics.jsonl")
fig, (ax1, ax2) = new_figure(2)
ax1.plot(*series(rl_metrics, "train/reward"), label="reward")
ax1.plot(*series(rl_metrics, "train/em"), label="EM")
ax1.set(title="RL rollouts (training questions)", xlabel="step", ylim=(-0.02, 1.02))
for task in eval_tasks(rl_metrics):
    ax2.plot(*series(rl_metrics, f"{task}/em"), marker="o", label=TASK_LABEL.get(task, task))
ax2.set(title="RL: held-out exact match", xlabel="step", ylabel="EM", ylim=(-0.02, 1.02))
for ax, what in ((ax1, "RL rollout"), (ax2, "held-out EM")):
    if any(len(line.get_xdata()) for line in ax.lines):
        ax.legend()
    else:
        no_data(ax, what)
plot_rl = save(fig, "rl.png")


# -----------------------------------------------------------------------------
# The report, top to bottom

def eval_result(source, task, retrieval=True):
    return read_json("eval", f"{source}_{task}{'' if retrieval else '_noretrieval'}.json")


def em_of(source, task, retrieval=True):
    result = eval_result(source, task, retrieval)
    return result["metrics"]["em"] if result else None


base_meta = latest_meta("base_checkpoints") or {}
rl_meta = latest_meta("chatrl_checkpoints") or {}   # "kept": start | best | last (chat_rl --keep-best)
model_cfg = base_meta.get("model_config", {})
params = re.search(r"([\d,]+) parameters", read_text("logs", "base.log") or read_text("logs", "import.log") or "")
lines = []
out = lines.append

out(f"# nanochat-rag speedrun: `{os.path.basename(run_dir)}`")
out("")
out(f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `scripts/report.py` from `{run_dir}`.")
out("")

# headline numbers first: what a reader wants to know
out("## Summary")
out("")
summary = [
    ("single-hop, documents shown (SFT)", em_of("sft", "world2"), em_of("sft", "world2", False)),
    ("2-hop, the model searches (SFT)", em_of("sft", "world3"), em_of("sft", "world3", False)),
    ("2-hop, the model searches (after RL)", em_of("rl", "world3"), em_of("rl", "world3", False)),
]
for what, with_r, without_r in summary:
    out(f"- Held-out {what}: EM **{pct(with_r)}** with retrieval, {pct(without_r)} without.")
shuffled = em_of("rl", "world2_shuffled")
if shuffled is not None:
    out(f"- Held-out single-hop with the shown documents in random order (after RL): EM **{pct(shuffled)}** "
        f"(in the retriever's order the asked entity's article is first: this one needs the right article found)")
if rl_meta.get("kept") == "start":
    out("- RL did not beat the SFT model on held-out EM: the final model is the SFT model unchanged.")
chat = {task: em_of("rl", task) for task in ("search2", "chat2", "turns2", "turns3", "abstain2", "abstain3")}
if any(v is not None for v in chat.values()):
    out(f"- In a chat (after RL): single-hop questions the model searches for itself, EM **{pct(chat['search2'])}** "
        f"(as the 2nd or 3rd turn: **{pct(chat['chat2'])}**); "
        f"the held-out questions as the 2nd or 3rd turn, EM **{pct(chat['turns2'])}** "
        f"(single-hop) and **{pct(chat['turns3'])}** (2-hop); about things the KB lacks, abstained "
        f"**{pct(chat['abstain2'])}** (documents shown) and **{pct(chat['abstain3'])}** (the model searches).")


def transfer_results():
    """(name, documents read, answers copied from them) per real-text QA set of the transfer stage."""
    folder = os.path.join(run_dir, "transfer")
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json") and not f.endswith(("_noretrieval.json", "_copied.json"))) \
        if os.path.isdir(folder) else []
    return [(n, read_json("transfer", f"{n}.json"), read_json("transfer", f"{n}_copied.json")) for n in names]


def mean_em(results):
    ems = [r["metrics"]["em"] for r in results if r]
    return sum(ems) / len(ems) if ems else None


transfer = transfer_results()
if transfer:
    copied = [c for _, _, c in transfer]
    out(f"- Transfer, real documents never seen (mean of {len(transfer)} sets made from text on this machine, RL model, "
        f"BM25 top 3): EM **{pct(mean_em([w for _, w, _ in transfer]))}**"
        + (f", **{pct(mean_em(copied))}** with answers copied from the documents." if all(copied) else "."))
out("")
out("Held-out means entities whose names never occur in any training text: without documents the model "
    "can only guess, so the gap between the two columns is what reading retrieved documents is worth.")
out("")

out("## Configuration")
out("")
cuda = None
try:
    import torch
    torch_version = torch.__version__
    if torch.cuda.is_available():
        cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
except ImportError:
    torch_version = "not installed"
cpu_name = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
        if m := re.search(r"model name\s*:\s*(.+)", f.read()):
            cpu_name = m.group(1).strip()
out("| | |")
out("|---|---|")
out(f"| mode | `{args.mode}` |")
out(f"| model tag | `{args.model_tag}` |")
out(f"| block pattern | `{model_cfg.get('block_pattern', '?')}` (T = attention, M = Mamba-2) |")
out(f"| layers / width / heads | {model_cfg.get('n_layer', '?')} / {model_cfg.get('n_embd', '?')} / {model_cfg.get('n_head', '?')} |")
out(f"| parameters | {params.group(1) if params else '?'} |")
out(f"| context / vocab | {model_cfg.get('sequence_len', '?')} / {model_cfg.get('vocab_size', '?')} |")
out(f"| processes per training stage | {args.nproc} |")
out(f"| machine | {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name}){', ' + cuda if cuda else ''} |")
out(f"| torch / python | {torch_version} / {platform.python_version()} |")
out("")
out("Each stage's command (from `logs/<stage>.done`; `launch` is python, or torchrun when there are several "
    "processes; `build_heldout_kb` and `evaluate` are functions in `speedrun_rag.sh`):")
out("")
out("```bash")
for stage in STAGES:
    done = stage_done(stage)
    if done:
        out(f"# {stage}")
        out(done[0])
out("```")
out("")

out("## Time per stage")
out("")
out("| stage | time | log |")
out("|---|---|---|")
total = 0
for stage in STAGES:
    done = stage_done(stage)
    if stage == "report":
        continue
    if done is None:
        if os.path.exists(os.path.join(run_dir, "logs", f"{stage}.log")):
            out(f"| {stage} | not finished | `logs/{stage}.log` |")
        continue
    total += done[1] or 0
    out(f"| {stage} | {fmt_time(done[1])} | `logs/{stage}.log` |")
out(f"| **total** | **{fmt_time(total)}** | |")
out("")

out("## Pretraining")
out("")
imported = base_meta.get("imported_from")
if imported:
    out(f"None here: the base model was trained by karpathy/nanochat and imported with `scripts.import_nanochat` "
        f"(`{imported['path']}` step {imported['step']}, generation {imported['generation']}; its logits unchanged).")
    out("")
if base_loss:
    out(f"{int(base_loss[-1][0])} steps, last training loss {base_loss[-1][1]:.3f} (smoothed {base_loss[-1][2]:.3f})"
        + (f", last validation {base_bpb[-1][1]:.4f} bits per byte." if base_bpb else "."))
    out("")
out(f"![pretraining loss and validation bpb]({plot_base})")
out("")

out("## SFT: retrieval-augmented and multi-hop conversations")
out("")
out("Loss is on what the assistant writes (answers and search queries); documents are context. "
    "Held-out EM and answer loss are measured every few steps on the held-out world.")
out("")
out(f"![SFT loss]({plot_sft_loss})")
out("")
out(f"![SFT held-out EM and answer loss]({plot_sft_heldout})")
out("")

out("## RL: the model writes its own searches")
out("")
rl_train = [r for r in rl_metrics if "train/reward" in r]
if rl_train:
    last = rl_train[-1]
    out(f"{last['step']} steps; last step: reward {last['train/reward']:.3f}, EM {last['train/em']:.3f}, "
        f"{last.get('train/searches', float('nan')):.2f} searches per answer, "
        f"gold-document recall {last.get('train/gold_recall', float('nan')):.2f}.")
    out("")
if rl_meta.get("kept") == "start":
    out(f"**RL did not beat the SFT model on held-out EM**: the RL checkpoint is the SFT model unchanged "
        f"(step 0 of {rl_meta.get('steps_trained')}); what the report calls RL below is that model.")
    out("")
elif rl_meta.get("kept") == "best":
    out(f"The RL checkpoint is step {rl_meta['step']} of {rl_meta.get('steps_trained')}, the best held-out evaluation.")
    out("")
out(f"![RL reward and EM]({plot_rl})")
out("")

out("## Retrieval metrics of the held-out KB (BM25)")
out("")
out("`kb/heldout` is built with `kb_tools.build_kb` from the held-out world's articles; "
    "these are `kb_tools.eval_retrieval` numbers (document level).")
out("")
out("| queries | n | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | queries/s |")
out("|---|---|---|---|---|---|---|---|")
for name, what in (("1hop", "single-hop questions"), ("2hop_question", "2-hop questions, one search"),
                   ("2hop_per_hop", "2-hop, each hop's query")):
    m = read_json("kb", f"retrieval_{name}.json")
    if m is None:
        out(f"| {what} | missing `kb/retrieval_{name}.json` | | | | | | |")
        continue
    out(f"| {what} | {m['queries']} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | "
        f"{m['mrr@10']:.3f} | {m['ndcg@10']:.3f} | {m['queries_per_s']:,.0f} |")
out("")
out("One search with a 2-hop question rarely finds both articles; searching hop by hop does. "
    "That is the skill SFT and RL teach.")
out("")

out("## Held-out exact match")
out("")
out("| held-out task | SFT, with retrieval | SFT, without | RL, with retrieval | RL, without |")
out("|---|---|---|---|---|")
for task in ("world2", "world3"):
    cells = [pct(em_of(source, task, retrieval)) for source in ("sft", "rl") for retrieval in (True, False)]
    out(f"| {TASK_LABEL[task]} (`{task}`) | " + " | ".join(cells) + " |")
out("")
out("Details (`eval/*.json`, written by `scripts.chat_eval --json-out`):")
out("")
out("| checkpoint | task | retrieval | EM | F1 | gold-doc recall | searches/question | questions |")
out("|---|---|---|---|---|---|---|---|")
for source in ("sft", "rl"):
    for task in ("world2", "world3"):
        for retrieval in (True, False):
            result = eval_result(source, task, retrieval)
            if result is None:
                continue
            m = result["metrics"]
            out(f"| {source} | {task} | {'yes' if retrieval else 'no'} | {pct(m['em'])} | {pct(m['f1'])} | "
                f"{pct(m.get('gold_recall'))} | {m.get('searches', float('nan')):.2f} | {m['n']} |")
out("")

out("## Transfer: real documents the model has never seen")
out("")
if transfer:
    out("Knowledge bases and questions made at run time from text on this machine by `kb_tools.machine_qa` "
        "(never training text), BM25 top 3, the RL model, greedy:")
    out("")
    out("| set | EM | F1 | answers copied: EM | gold-doc recall | questions |")
    out("|---|---|---|---|---|---|")
    for name, with_r, copied_r in transfer:
        m = with_r["metrics"]
        out(f"| `{name}` | {pct(m['em'])} | {pct(m['f1'])} | {pct(copied_r['metrics']['em'] if copied_r else None)} | "
            f"{pct(m.get('gold_recall'))} | {m['n']} |")
    out("")
    out("Answers copied: `chat_eval --copy-answers`, every answer token keeps the answer a piece of the documents shown.")
else:
    out("No transfer results yet (`transfer/*.json`).")
out("")
long_sets = sorted({f.rsplit("_top", 1)[0] for f in os.listdir(os.path.join(run_dir, "transfer", "long")) if f.endswith(".json")}) \
    if os.path.isdir(os.path.join(run_dir, "transfer", "long")) else []
if long_sets:
    out("Long multi-field entries (`kb_tools.machine_qa --sources dpkg,pymeta`: 150-750 tokens each, several values "
        "of one kind per entry), BM25 top 1 and top 3; wrong answers of top 3 by where they came from:")
    out("")
    out("| set | top 1: EM | top 3: EM | copied, top 1 / top 3: EM | top 3: gold shown | top 3 wrong answers | questions |")
    out("|---|---|---|---|---|---|---|")
    for name in long_sets:
        top1, top3 = (read_json("transfer", "long", f"{name}_top{k}.json") for k in (1, 3))
        copied1, copied3 = (read_json("transfer", "long", f"{name}_top{k}_copied.json") for k in (1, 3))
        if not (top1 and top3):
            continue
        m1, m3 = top1["metrics"], top3["metrics"]
        errors = {}
        for counts in m3.get("errors", {}).values():
            for why, c in counts.items():
                errors[why] = errors.get(why, 0) + c
        out(f"| `{name}` | {pct(m1['em'])} | {pct(m3['em'])} | "
            f"{pct(copied1['metrics']['em'] if copied1 else None)} / {pct(copied3['metrics']['em'] if copied3 else None)} | "
            f"{pct(m3.get('gold_recall'))} | "
            f"{', '.join(f'{c} {why}' for why, c in sorted(errors.items(), key=lambda kv: -kv[1]))} | {m3['n']} |")
    out("")

out("## The retriever learns from the model")
out("")
kb_manifest = read_json("retriever", "kb", "manifest.json") or {}
encoder = kb_manifest.get("query_encoder")
if encoder:
    base_m, tuned_m = encoder["heldout_metrics"]["base"], encoder["heldout_metrics"]["tuned"]
    out(f"REPLUG-LSR (`scripts/retriever_train.py --objective lsr`): the SFT model scored the candidate articles of "
        f"{encoder['data']['train_questions']} descriptive questions (an entity described by its facts, never named) "
        f"and MiniLM's query encoder learned from those scores, without document labels; best step "
        f"{encoder['best_step']} of {encoder['steps']}. Held-out questions are about other articles "
        f"({encoder['data']['heldout_questions']}); the RL model answers them from the top 3:")
    out("")
    out("| retriever | Recall@1 | Recall@5 | MRR@10 | EM (RL model) |")
    out("|---|---|---|---|---|")
    rows = [("BM25", read_json("retriever", "retrieval_bm25.json"), read_json("retriever", "em_bm25_tuned.json")),
            ("MiniLM, base query encoder", base_m, read_json("retriever", "em_dense_base.json")),
            ("MiniLM, LSR-trained query encoder", tuned_m, read_json("retriever", "em_dense_tuned.json"))]
    for name, m, em in rows:
        r = (lambda key: pct(m[key]) if m else "")
        out(f"| {name} | {r('recall@1')} | {r('recall@5')} | {r('mrr@10')} | {pct(em['metrics']['em']) if em else '?'} |")
elif os.path.isdir(os.path.join(run_dir, "retriever")):
    out("The retriever stage kept the base encoder: no training step beat it on held-out MRR@10 (see `logs/retriever.log`).")
else:
    out("No retriever stage in this run (`retriever/`).")
out("")

out("## Sample conversations")
out("")
samples = eval_result("rl", "world3") or eval_result("sft", "world3")
if samples and samples.get("records"):
    out(f"The first three held-out 2-hop questions, answered by the {samples['source'].upper()} model "
        "(greedy): its searches, the documents each search returned, and its answer.")
    out("")
    for i, r in enumerate(samples["records"][:3], 1):
        out(f"**{i}. {r['question']}** (gold: {', '.join(map(str, r.get('answers') or []))}; "
            f"{'correct' if r.get('em') else 'wrong'})")
        out("")
        out("```text")
        n = 0
        for part in r.get("parts", []):
            if part["type"] == "search":
                out(f"search: {clean(part['text'])}")
            elif part["type"] == "search_results":
                if not part["documents"]:
                    out("    (nothing found)")
                for d in part["documents"]:
                    n += 1
                    text = " ".join(str(d.get("text", "")).split())
                    out(f"    [{n}] {clean(d.get('title') or d.get('id'))}: {clean(text[:150])}{'...' if len(text) > 150 else ''}")
        out(f"answer: {clean(r['answer'])}")
        out("```")
        out("")
else:
    out("No evaluation records yet (`eval/rl_world3.json`).")
    out("")

out("## Chat with the model")
out("")
rel = os.path.relpath(run_dir)
show = rel if not rel.startswith("..") else run_dir
out("From the repo root:")
out("")
out("```bash")
out(f"NANOCHAT_BASE_DIR={show} .venv/bin/python -m scripts.chat_cli --source rl --model-tag {args.model_tag} --kb {show}/kb/heldout")
out(f"NANOCHAT_BASE_DIR={show} .venv/bin/python -m scripts.chat_web --source rl --model-tag {args.model_tag} --kb {show}/kb/heldout")
out("```")
out("")

report_path = os.path.join(run_dir, "report.md")
tmp = report_path + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
os.replace(tmp, report_path)
print(f"wrote {report_path} and {len(os.listdir(plot_dir))} plots in {plot_dir}")

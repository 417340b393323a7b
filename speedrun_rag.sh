#!/usr/bin/env bash
# The whole pipeline in one command:
#   tokenizer -> base pretraining -> SFT (RAG + multi-hop search) -> RL (the model searches)
#   -> held-out knowledge base + evaluation -> report.md with plots -> how to chat with the model
#
#   bash speedrun_rag.sh                         # CPU: embedded offline knowledge world, tiny model (<= 45 min on 2 cores)
#   bash speedrun_rag.sh --smoke                 # the same pipeline with toy settings, in a couple of minutes
#   BLOCK_PATTERN=TMTM bash speedrun_rag.sh      # hybrid Transformer/Mamba (one letter per layer: T or M)
#   bash speedrun_rag.sh --gpu                   # nanochat-d20-class run over FineWeb-Edu on all GPUs (auto-detected)
#   bash speedrun_rag.sh --from-nanochat ~/.cache/nanochat/base_checkpoints/d20 --nanochat-tokenizer ~/.cache/nanochat/tokenizer
#                                                # your karpathy/nanochat model instead of tokenizer + pretraining:
#                                                # imported (scripts.import_nanochat), then SFT, RL, eval as usual
#
# Everything a run makes lives in its run directory, runs/<mode>_<model tag> by default (--run-dir
# to change). The run directory is the NANOCHAT_BASE_DIR of every stage, so runs never share a
# tokenizer or checkpoints; downloads (FineWeb-Edu shards, Hugging Face datasets) are shared
# through the cache at $NANOCHAT_BASE_DIR (default ~/.cache/nanochat-rag, not karpathy/nanochat's).
#
# Each stage logs to <run dir>/logs/<stage>.log and leaves <stage>.done (its command and seconds)
# when it succeeds. Rerunning skips a stage whose marker holds the same command, so a killed run
# resumes after the last finished stage; once one stage runs, every stage after it runs too (they
# consume its output). --fresh deletes the run directory and starts over.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"   # the comment block at the top of this file
    echo
    echo "flags: --smoke | --gpu | --cpu | --fresh | --block-pattern P | --run-dir DIR | --from-nanochat CKPT_DIR | --nanochat-tokenizer TOK_DIR | -h"
    echo "env:   BLOCK_PATTERN, RUN_DIR, NPROC (processes per training stage), SEED (a replicate: base init and data, fine-tuning streams), NANOCHAT_BASE_DIR (download cache),"
    echo "       NANOCHAT_REALTEXT_CACHE (the scan of this machine's real text, shared by runs; default \$NANOCHAT_BASE_DIR/realtext),"
    echo "       QUERY_POSITION (after | before | both: the question relative to its documents, chat_sft --query-position),"
    echo "       MAMBA_INIT (default | mimetic | induction: base_train --mamba-init),"
    echo "       BASE_ITERS, SFT_ITERS, RL_ITERS (override the mode's step counts, e.g. a longer SFT for a Mamba pattern),"
    echo "       NANOCHAT_ARCH=1 (base_train --nanochat-arch: nanochat master's trunk features),"
    echo "       NANOCHAT_SOFTCAP (--from-nanochat: the model's logit softcap when not 15, see scripts.import_nanochat --help)"
}

MODE="" FRESH=0 FROM_NANOCHAT="" NANOCHAT_TOK=""
USER_BASE_ITERS="${BASE_ITERS:-}" USER_SFT_ITERS="${SFT_ITERS:-}" USER_RL_ITERS="${RL_ITERS:-}"
BLOCK_PATTERN="${BLOCK_PATTERN:-}"
RUN_DIR="${RUN_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) MODE=smoke ;;
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --fresh) FRESH=1 ;;
        --block-pattern) BLOCK_PATTERN="${2:?--block-pattern needs a value}"; shift ;;
        --block-pattern=*) BLOCK_PATTERN="${1#*=}" ;;
        --run-dir) RUN_DIR="${2:?--run-dir needs a value}"; shift ;;
        --run-dir=*) RUN_DIR="${1#*=}" ;;
        --from-nanochat) FROM_NANOCHAT="${2:?--from-nanochat needs a checkpoint directory}"; shift ;;
        --from-nanochat=*) FROM_NANOCHAT="${1#*=}" ;;
        --nanochat-tokenizer) NANOCHAT_TOK="${2:?--nanochat-tokenizer needs a directory}"; shift ;;
        --nanochat-tokenizer=*) NANOCHAT_TOK="${1#*=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# GPU when one is visible (nvidia-smi lists it), unless --cpu or --smoke says otherwise
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ -z "$MODE" ]; then
    if [ "$NUM_GPUS" -gt 0 ]; then MODE=gpu; else MODE=cpu; fi
fi

# =================================================================================================
# The recipe. Every mode sets the same variables, and every stage passes all of them, so the CPU
# run exercises each flag the GPU run uses; only the numbers differ.
# =================================================================================================
if [ "$MODE" = cpu ]; then
    # offline data: the generated knowledge world mixed half and half with real English found on
    # the machine (docstrings of the installed packages, /usr/share/doc), so the tokenizer and the
    # model know real words. A 4-layer width-128 model with tied embeddings (untied, it never
    # learned to copy names from documents), both cores, pretrained for 1,000 steps (4M tokens: at
    # 300 steps val bpb was still falling fast, and SFT then took 440 steps to learn its first
    # stage instead of 90). SFT is a curriculum: one document, then
    # distractors, then 2-hop search, then 3-hop, with reading drills (real-English schemas in many
    # document shapes) from the second stage on so the skill is reading, not this world's four
    # templates (a stage moves on when its first task, a world level, is learned);
    # RL on 2-hop with the model's own searches (and some drills) does the rest. Attention inputs
    # get a 4-tap short conv (--short-conv): held-out drills 34/24/19% -> 93/60/45% after SFT.
    DEPTH=4  ASPECT=32  HEAD_DIM=32  SEQ_LEN=512  VOCAB=4096  DATA=embedded:1+realtext:1+reading:1  FINEWEB_SHARDS=0  TIE=--tie-embeddings
    TOK_CHARS=5000000  COMPILE=--compile  SHORT_CONV=4
    BASE_ITERS=1000  BASE_BATCH=8  BASE_TOTAL_BATCH=-1  BASE_EVAL_EVERY=250  BASE_EVAL_TOKENS=65536  BASE_SAMPLE_EVERY=0
    SFT_CURRICULUM=world1,world2:0.5+world1:0.2+read1:0.3,world3:0.4+world2:0.15+read1:0.2+read3:0.25+turns3:0.1+abstain2:0.07+abstain3:0.05+search2:0.1+chat2:0.1+entries:0.15,world3:0.35+world4:0.2+world2:0.1+read1:0.1+read2:0.1+read3:0.15+turns2:0.1+turns3:0.1+abstain2:0.07+abstain3:0.05+search2:0.1+chat2:0.1+entries:0.2
    SFT_ITERS=1200  SFT_BATCH=8  SFT_EVAL_EVERY=200  SFT_EVAL_EXAMPLES=40  SFT_ADVANCE_EM=0.9
    RL_CURRICULUM=world3:0.45+world2:0.1+read1:0.1+turns3:0.1+abstain3:0.1+search2:0.15+entries:0.1  RL_ADVANTAGE=grpo  RL_LR_FRAC=0.3
    RL_ITERS=200  RL_PROMPTS=8  RL_SAMPLES=8  RL_MAX_NEW_TOKENS=48  RL_EVAL_EVERY=50  RL_EVAL_EXAMPLES=60
    EVAL_EXAMPLES=100  EVAL_MAX_NEW_TOKENS=64  TRANSFER_QUESTIONS=100  RETRIEVER_STEPS=150
    TRANSFER_SETS=httpstatus,errno,countries,currencies,services,manpages  LONG_SETS=dpkg,pymeta
    NPROC="${NPROC:-1}"
elif [ "$MODE" = smoke ]; then
    # toy sizes: checks that every stage runs and the report builds, in a couple of minutes
    DEPTH=2  ASPECT=32  HEAD_DIM=32  SEQ_LEN=256  VOCAB=2048  DATA=embedded:1+realtext:1+reading:1  FINEWEB_SHARDS=0  TIE=--tie-embeddings
    TOK_CHARS=300000  COMPILE=--no-compile  SHORT_CONV=4
    BASE_ITERS=20  BASE_BATCH=4  BASE_TOTAL_BATCH=-1  BASE_EVAL_EVERY=10  BASE_EVAL_TOKENS=2048  BASE_SAMPLE_EVERY=0
    SFT_CURRICULUM=world1,world2:0.5+world1:0.2+read1:0.3,world3:0.4+world2:0.15+read1:0.2+read3:0.25+turns3:0.1+abstain2:0.07+abstain3:0.05+search2:0.1+chat2:0.1+entries:0.15,world3:0.35+world4:0.2+world2:0.1+read1:0.1+read2:0.1+read3:0.15+turns2:0.1+turns3:0.1+abstain2:0.07+abstain3:0.05+search2:0.1+chat2:0.1+entries:0.2
    SFT_ITERS=10  SFT_BATCH=4  SFT_EVAL_EVERY=5  SFT_EVAL_EXAMPLES=4  SFT_ADVANCE_EM=0.9
    RL_CURRICULUM=world3:0.45+world2:0.1+read1:0.1+turns3:0.1+abstain3:0.1+search2:0.15+entries:0.1  RL_ADVANTAGE=grpo  RL_LR_FRAC=0.3
    RL_ITERS=3  RL_PROMPTS=2  RL_SAMPLES=2  RL_MAX_NEW_TOKENS=16  RL_EVAL_EVERY=2  RL_EVAL_EXAMPLES=4
    EVAL_EXAMPLES=4  EVAL_MAX_NEW_TOKENS=16  TRANSFER_QUESTIONS=4  RETRIEVER_STEPS=2
    TRANSFER_SETS=httpstatus,errno  LONG_SETS=pymeta   # two of the six sets and one long one: each is ~3 processes
    NPROC="${NPROC:-1}"
elif [ "$MODE" = gpu ]; then
    # nanochat d20 class (~560M parameters, Chinchilla-style 20 tokens per parameter = ~11B
    # tokens of FineWeb-Edu), then SFT on the knowledge world + SmolTalk + HotpotQA, and RL.
    # Expected (not run in this repo's CI): ~4-5 h on 8xH100, ~$100-130 at ~$24/h per node.
    DEPTH=20  ASPECT=64  HEAD_DIM=128  SEQ_LEN=2048  VOCAB=65536  DATA=fineweb  FINEWEB_SHARDS=240  TIE=
    TOK_CHARS=2000000000  COMPILE=--compile  SHORT_CONV=4
    BASE_ITERS=21400  BASE_BATCH=32  BASE_TOTAL_BATCH=524288  BASE_EVAL_EVERY=250  BASE_EVAL_TOKENS=10485760  BASE_SAMPLE_EVERY=2000
    SFT_CURRICULUM=world1+read1+smoltalk,world2+world3+read3+smoltalk+hotpotqa
    SFT_ITERS=2000  SFT_BATCH=16  SFT_EVAL_EVERY=200  SFT_EVAL_EXAMPLES=200  SFT_ADVANCE_EM=0.9
    RL_CURRICULUM=world2,world3,world4  RL_ADVANTAGE=grpo  RL_LR_FRAC=0.1
    RL_ITERS=300  RL_PROMPTS=16  RL_SAMPLES=16  RL_MAX_NEW_TOKENS=128  RL_EVAL_EVERY=50  RL_EVAL_EXAMPLES=200
    EVAL_EXAMPLES=500  EVAL_MAX_NEW_TOKENS=128  TRANSFER_QUESTIONS=500  RETRIEVER_STEPS=300
    TRANSFER_SETS=httpstatus,errno,countries,currencies,services,manpages  LONG_SETS=dpkg,pymeta
    NPROC="${NPROC:-$NUM_GPUS}"
    if [ "$NPROC" -lt 1 ]; then echo "error: --gpu, but nvidia-smi lists no GPU" >&2; exit 1; fi
else
    echo "error: unknown mode '$MODE'" >&2; exit 2
fi

BASE_ITERS="${USER_BASE_ITERS:-$BASE_ITERS}"  SFT_ITERS="${USER_SFT_ITERS:-$SFT_ITERS}"  RL_ITERS="${USER_RL_ITERS:-$RL_ITERS}"
for n in "$BASE_ITERS" "$SFT_ITERS" "$RL_ITERS"; do
    if [[ ! "$n" =~ ^[1-9][0-9]*$ ]]; then echo "error: BASE_ITERS, SFT_ITERS and RL_ITERS must be positive integers, got '$n'" >&2; exit 2; fi
done

# a nanochat model brings its own depth (a stack of attention blocks) and tokenizer
if [ -n "$FROM_NANOCHAT" ]; then
    if [ -n "$BLOCK_PATTERN" ]; then echo "error: --from-nanochat brings its own layers; drop BLOCK_PATTERN / --block-pattern" >&2; exit 2; fi
    if [ ! -d "$FROM_NANOCHAT" ]; then echo "error: --from-nanochat $FROM_NANOCHAT: no such directory" >&2; exit 2; fi
    FROM_NANOCHAT="$(cd "$FROM_NANOCHAT" && pwd)"
    if [ -n "$NANOCHAT_TOK" ]; then NANOCHAT_TOK="$(cd "$NANOCHAT_TOK" && pwd)"; fi
    DEPTH=$(python3 - "$FROM_NANOCHAT" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
if os.path.exists(os.path.join(d, "config.json")):
    print(json.load(open(os.path.join(d, "config.json")))["num_hidden_layers"])
else:
    metas = sorted(glob.glob(os.path.join(d, "meta_*.json")))
    print(json.load(open(metas[-1]))["model_config"]["n_layer"] if metas else 0)
EOF
)
    if [ "$DEPTH" -lt 1 ]; then echo "error: --from-nanochat $FROM_NANOCHAT: no meta_<step>.json (or config.json) in it" >&2; exit 2; fi
fi

# the block pattern has one letter per layer, so when given it sets the depth
BLOCK_PATTERN="$(echo "$BLOCK_PATTERN" | tr '[:lower:]' '[:upper:]')"
if [ -n "$BLOCK_PATTERN" ]; then
    if [[ ! "$BLOCK_PATTERN" =~ ^[TM]+$ ]]; then
        echo "error: BLOCK_PATTERN must be letters T (attention) and M (Mamba), got '$BLOCK_PATTERN'" >&2; exit 2
    fi
    DEPTH=${#BLOCK_PATTERN}
else
    BLOCK_PATTERN=$(printf 'T%.0s' $(seq "$DEPTH"))
fi
# the checkpoint tag base_train uses; SFT, RL, eval and chat load exactly this model
if [[ "$BLOCK_PATTERN" =~ ^T+$ ]]; then TAG="d$DEPTH"; else TAG="d${DEPTH}_$BLOCK_PATTERN"; fi

# a pure Mamba stack reads only with an induction-head init, and moves on from one-document copying
# at 70% instead of 90% (it can plateau there on common-word answers); the question goes before and
# after its documents (JRT; `after` measured the same). A pure-M base copies nothing after
# pretraining (reading probe 0.00) and learns it in SFT, early or late depending on its validation
# loss: at 1000 base steps (val bpb 1.69-1.75) after 300-2,200 SFT steps, so some runs ended at
# 81-90% single-hop even with 3600 SFT steps. On CPU it pretrains 1500 steps (bpb 1.60-1.69; four
# fresh runs at 93-100% single-hop), then 2800 SFT steps (700 per stage below) at the full learning rate
# (at 0.3 copying came too late); its RL is shorter (100 steps: RL's guard kept the SFT model in most
# pure-M runs) and keeps more single-hop questions (0.25 instead of 0.1: RL cost pure-M runs 3-14
# points of single-hop). docs/mamba.md.
if [[ "$BLOCK_PATTERN" =~ ^M+$ ]]; then
    QUERY_POSITION="${QUERY_POSITION:-both}"  MAMBA_INIT="${MAMBA_INIT:-induction}"  SFT_ADVANCE_EM=0.7
    if [ "$MODE" = cpu ]; then
        BASE_ITERS="${USER_BASE_ITERS:-1500}"  SFT_ITERS="${USER_SFT_ITERS:-2800}"  RL_ITERS="${USER_RL_ITERS:-100}"
        RL_CURRICULUM=world3:0.3+world2:0.25+read1:0.1+turns3:0.1+abstain3:0.1+search2:0.15+entries:0.1
    fi
fi
# Some bases plateau under a gate (two fresh pure-M runs sat in world2 for 650 steps and never met
# 2-hop search; a fresh TTTT base, SEED=2, sat at ~65% batch EM in world1 for 225 steps): each of
# the four stages moves on after a quarter of SFT's steps whatever its EM (a third left a stalled
# MMMM run no steps for the last stage)
SFT_MAX_STAGE_STEPS=$(( SFT_ITERS / 4 ))

# directories: the run's own, and the shared download cache
CACHE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-rag}"
RUN_DIR="${RUN_DIR:-runs/${MODE}_${FROM_NANOCHAT:+nanochat_}$TAG}"
# stages delete their old outputs (and --fresh the whole directory): only ever in a directory
# this script made, which it marks with a .speedrun file
if [ -d "$RUN_DIR" ] && [ -n "$(ls -A "$RUN_DIR")" ] && [ ! -f "$RUN_DIR/.speedrun" ]; then
    echo "error: $RUN_DIR is not empty and is not a speedrun directory (no .speedrun file): pick another --run-dir" >&2; exit 1
fi
if [ "$FRESH" = 1 ]; then
    rm -rf "$RUN_DIR"
fi
mkdir -p "$RUN_DIR/logs"
touch "$RUN_DIR/.speedrun"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
SHOW_DIR="${RUN_DIR#"$PWD"/}"   # as typed from the repo root, when it is inside it
export NANOCHAT_BASE_DIR="$RUN_DIR"
# the scan of this machine's real text (base data, reading drills' words) is shared by every run
export NANOCHAT_REALTEXT_CACHE="${NANOCHAT_REALTEXT_CACHE:-$CACHE_DIR/realtext}"
SEED="${SEED:-0}"   # another SEED is a replicate: base weights and data, SFT's (and, plus one, RL's) example streams
QUERY_POSITION="${QUERY_POSITION:-after}"   # where questions go relative to their documents (saved with the model)
MAMBA_INIT="${MAMBA_INIT:-default}"         # default | mimetic: how M blocks start (base_train --mamba-init)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
export PYTHONUNBUFFERED=1
echo "speedrun: mode $MODE, model $TAG (pattern $BLOCK_PATTERN), $NPROC process(es) x $OMP_NUM_THREADS thread(s), run dir $SHOW_DIR"

# =================================================================================================
# Environment: .venv with torch and this project. Nothing is installed when the imports work.
# =================================================================================================
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    python3 -m venv .venv
    "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    # the CPU wheel here; on Linux x86_64 PyPI's torch is the CUDA build, so a GPU node gets that
    "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import nanochat, tasks, kb_tools, rustbpe, tiktoken, bm25s, matplotlib, fastapi, uvicorn" 2>/dev/null; then
    "$PY" -m pip install -q -e .
fi
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "error: --gpu, but this torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device: install a CUDA build of torch into .venv" >&2
    exit 1
fi

# =================================================================================================
# The stage runner
# =================================================================================================
RERUN_REST=0   # set once a stage runs: every later stage reads its output, so it must run too

# stage NAME OUTPUT COMMAND...: run COMMAND, its output to the terminal and logs/NAME.log.
# OUTPUT (a path in the run dir) is deleted first so a stage never mixes with an older attempt
# (e.g. chat_eval loads the highest checkpoint step it finds).
stage() {
    local name=$1 output=$2; shift 2
    local log="$RUN_DIR/logs/$name.log" done="$RUN_DIR/logs/$name.done" cmd="$*"
    if [ "$RERUN_REST" = 0 ] && [ -f "$done" ] && [ "$(head -n 1 "$done")" = "$cmd" ]; then
        echo "== $name: done before in $(sed -n 2p "$done")s, skipping ($SHOW_DIR/logs/$name.done)"
        return
    fi
    RERUN_REST=1
    rm -f "$done"
    rm -rf "${RUN_DIR:?}/$output"
    echo "== $name: $cmd"
    echo "== $name: log $SHOW_DIR/logs/$name.log"
    local t0=$SECONDS status
    set +e
    ( set -e; "$@" ) 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" != 0 ]; then
        echo "speedrun: stage '$name' FAILED (exit $status); its log: $SHOW_DIR/logs/$name.log" >&2
        exit 1
    fi
    printf '%s\n%s\n' "$cmd" "$((SECONDS - t0))" > "$done"
    echo "== $name: done in $((SECONDS - t0))s"
}

# training stages use every process (torchrun) when there are several
launch() {
    if [ "$NPROC" -gt 1 ]; then
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
    else
        "$PY" "$@"
    fi
}

# FineWeb-Edu shards into the shared cache (GPU mode); the embedded data needs no download
download() {
    "$PY" -m nanochat.dataset -n "$1" --data-dir "$CACHE_DIR/base_data"
    # SmolTalk / HotpotQA parquet files go to <base dir>/hf_datasets: share the cache's
    mkdir -p "$CACHE_DIR/hf_datasets"
    ln -sfn "$CACHE_DIR/hf_datasets" "$RUN_DIR/hf_datasets"
}
if [ "$DATA" = fineweb ]; then DATA="$CACHE_DIR/base_data"; fi   # base_train/tok_train read a parquet directory

# The held-out knowledge world as files: its articles as a KB (bm25), its QA files, and retrieval
# metrics of that KB for the questions (single-hop), the 2-hop questions asked as one search, and
# each hop's own query (what a model that searches hop by hop would send).
build_heldout_kb() {
    local kb="$RUN_DIR/kb"
    "$PY" -m tasks.knowledge_world --out "$kb/world" "$@"
    "$PY" -m kb_tools.build_kb --input "$kb/world/heldout_kb.jsonl" --out "$kb/heldout" --retrievers bm25 --no-progress
    "$PY" - "$kb" <<'EOF'
import json, sys
kb = sys.argv[1]
def convert(src, dst, per_hop):
    with open(f"{kb}/world/{src}") as f, open(f"{kb}/{dst}", "w") as out:
        for row in map(json.loads, f):
            pairs = zip(row["queries"], row["hops"]) if per_hop else [(row["question"], row["supporting_ids"])]
            for query, relevant in pairs:
                out.write(json.dumps({"query": query, "relevant": relevant if isinstance(relevant, list) else [relevant]}) + "\n")
convert("heldout_qa_1hop.jsonl", "queries_1hop.jsonl", per_hop=False)
convert("heldout_qa_2hop.jsonl", "queries_2hop_question.jsonl", per_hop=False)
convert("heldout_qa_2hop.jsonl", "queries_2hop_per_hop.jsonl", per_hop=True)
EOF
    for q in 1hop 2hop_question 2hop_per_hop; do
        "$PY" -m kb_tools.eval_retrieval --kb "$kb/heldout" --queries "$kb/queries_$q.jsonl" --retriever bm25 --json \
            | tee "$kb/retrieval_$q.json"
    done
}

# Held-out knowledge world, SFT and RL checkpoints: single-hop with the documents shown (world2)
# and 2-hop where the model writes its own searches (world3), each with and without retrieval.
evaluate() {
    mkdir -p "$RUN_DIR/eval"
    local source task
    for source in sft rl; do
        for task in world2 world3; do
            "$PY" -m scripts.chat_eval --source $source --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" \
                --task $task "$@" --json-out "$RUN_DIR/eval/${source}_${task}.json"
            "$PY" -m scripts.chat_eval --source $source --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" \
                --task $task "$@" --no-retrieval --json-out "$RUN_DIR/eval/${source}_${task}_noretrieval.json"
        done
    done
    # a chat: single-hop questions the model searches for itself (retrieval mode auto), the same
    # held-out questions as the 2nd or 3rd turn (earlier questions as history), and questions about
    # things the KB lacks (abstained = answered "The documents do not say.")
    for task in search2 chat2 turns2 turns3 abstain2 abstain3; do
        "$PY" -m scripts.chat_eval --source rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" \
            --task $task "$@" --json-out "$RUN_DIR/eval/rl_${task}.json"
    done
    # single-hop with the shown documents in random order: BM25 ranks the asked entity's article
    # first, so world2 alone cannot tell reading which document is about what from copying document 1
    "$PY" -m scripts.chat_eval --source rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" \
        --task world2 "$@" --shuffle-documents --json-out "$RUN_DIR/eval/rl_world2_shuffled.json"
}

# Zero-shot reading of real documents: KBs and questions made from text on this machine
# (kb_tools.machine_qa: HTTP status codes, errno, ISO country and currency codes, /etc/services,
# man pages; none of it is ever training text), the RL model reading BM25's documents, and with its
# answers copied from them (chat_eval --copy-answers: values whole, not garbled). Without documents it
# scored 0-1% on every set in every run (runs up to cpu_r32), so that control is no longer run.
transfer() {
    local dir="$RUN_DIR/transfer" qa name
    "$PY" -m kb_tools.machine_qa --out "$dir/data" --sources "$2" --max-questions "$1"
    for qa in "$dir"/data/*_qa.jsonl; do
        name=$(basename "$qa" _qa.jsonl)
        "$PY" -m kb_tools.build_kb --input "$dir/data/${name}_kb.jsonl" --out "$dir/kb_$name" --retrievers bm25 --no-progress
        for copy in "" --copy-answers; do
            "$PY" -m scripts.chat_eval --source rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" --qa "$qa" \
                --kb "$dir/kb_$name" --num-examples "$1" --max-new-tokens 32 --show 0 $copy --json-out "$dir/$name${copy:+_copied}.json"
        done
    done
    # long multi-field entries (installed Debian packages, Python distributions' metadata; where the machine
    # has them), read from BM25's top 1 and top 3: more documents must not make the answers worse
    "$PY" -m kb_tools.machine_qa --out "$dir/long/data" --sources "$3" --max-questions "$1"
    for qa in "$dir"/long/data/*_qa.jsonl; do
        [ -e "$qa" ] || continue
        name=$(basename "$qa" _qa.jsonl)
        "$PY" -m kb_tools.build_kb --input "$dir/long/data/${name}_kb.jsonl" --out "$dir/long/kb_$name" --retrievers bm25 --no-progress
        for k in 1 3; do for copy in "" --copy-answers; do
            "$PY" -m scripts.chat_eval --source rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" --qa "$qa" \
                --kb "$dir/long/kb_$name" --top-k $k --num-examples "$1" --max-new-tokens 32 --show 0 $copy \
                --json-out "$dir/long/${name}_top$k${copy:+_copied}.json"
        done; done
    done
}

# The retriever learns from the model (REPLUG-LSR): the held-out world's articles as a dense KB,
# questions that describe an entity by its facts instead of naming it (base MiniLM finds ~half),
# the SFT model as the teacher, no document labels. Then the RL model answers the held-out
# descriptive questions with BM25, base MiniLM and the trained query encoder.
retriever() {
    local dir="$RUN_DIR/retriever" how
    mkdir -p "$dir"
    "$PY" -m kb_tools.build_kb --input "$RUN_DIR/kb/world/heldout_kb.jsonl" --out "$dir/kb" --retrievers bm25,dense --no-progress
    "$PY" -m scripts.retriever_train --kb "$dir/kb" --qa "$RUN_DIR/kb/world/heldout_qa_descriptive.jsonl" --objective lsr \
        --source sft --model-tag "$TAG" --steps "$RETRIEVER_STEPS" --heldout-out "$dir/heldout_qa.jsonl" --no-progress
    "$PY" -m kb_tools.eval_retrieval --kb "$dir/kb" --queries "$dir/heldout_qa.jsonl" --retriever bm25 --json \
        | tee "$dir/retrieval_bm25.json"
    for how in "bm25 tuned" "dense base" "dense tuned"; do
        set -- $how
        "$PY" -m scripts.chat_eval --source rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" --qa "$dir/heldout_qa.jsonl" \
            --kb "$dir/kb" --retriever "$1" --query-encoder "$2" --num-examples "$EVAL_EXAMPLES" --max-new-tokens 16 \
            --show 0 --json-out "$dir/em_${1}_$2.json"
    done
}

# =================================================================================================
# The pipeline
# =================================================================================================
T_START=$SECONDS
if [ "$FINEWEB_SHARDS" -gt 0 ]; then
    stage data hf_datasets download "$FINEWEB_SHARDS"
fi
if [ -n "$FROM_NANOCHAT" ]; then
    # the model keeps nanochat's exact logits; the zero-initialised short conv (a no-op until SFT trains it)
    # is this recipe's reading aid
    stage import base_checkpoints \
        "$PY" -m scripts.import_nanochat --from "$FROM_NANOCHAT" ${NANOCHAT_TOK:+--tokenizer "$NANOCHAT_TOK"} --tag "$TAG" \
        --out-base-dir "$RUN_DIR" --short-conv "$SHORT_CONV" ${NANOCHAT_SOFTCAP:+--softcap "$NANOCHAT_SOFTCAP"}
else
stage tokenizer tokenizer \
    "$PY" -m scripts.tok_train --data "$DATA" --vocab-size "$VOCAB" --max-chars "$TOK_CHARS"
stage base base_checkpoints \
    launch -m scripts.base_train --depth "$DEPTH" --aspect-ratio "$ASPECT" --head-dim "$HEAD_DIM" \
    --block-pattern "$BLOCK_PATTERN" --max-seq-len "$SEQ_LEN" --data "$DATA" --num-iterations "$BASE_ITERS" \
    --device-batch-size "$BASE_BATCH" --total-batch-size "$BASE_TOTAL_BATCH" --eval-every "$BASE_EVAL_EVERY" \
    --eval-tokens "$BASE_EVAL_TOKENS" --sample-every "$BASE_SAMPLE_EVERY" --model-tag "$TAG" --short-conv "$SHORT_CONV" --mamba-init "$MAMBA_INIT" $TIE $COMPILE ${NANOCHAT_ARCH:+--nanochat-arch} --seed "$SEED"
fi
stage sft chatsft_checkpoints \
    launch -m scripts.chat_sft --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" --curriculum "$SFT_CURRICULUM" \
    --num-iterations "$SFT_ITERS" --device-batch-size "$SFT_BATCH" --eval-every "$SFT_EVAL_EVERY" \
    --eval-examples "$SFT_EVAL_EXAMPLES" --advance-em "$SFT_ADVANCE_EM" --max-stage-steps "$SFT_MAX_STAGE_STEPS" --seed "$SEED" --query-position "$QUERY_POSITION" $COMPILE
stage rl chatrl_checkpoints \
    launch -m scripts.chat_rl --model-tag "$TAG" --block-pattern "$BLOCK_PATTERN" --curriculum "$RL_CURRICULUM" \
    --num-iterations "$RL_ITERS" --prompts-per-step "$RL_PROMPTS" --num-samples "$RL_SAMPLES" \
    --advantage "$RL_ADVANTAGE" --lr-frac "$RL_LR_FRAC" --max-new-tokens "$RL_MAX_NEW_TOKENS" \
    --eval-every "$RL_EVAL_EVERY" --eval-examples "$RL_EVAL_EXAMPLES" --seed "$((SEED + 1))"
stage kb kb \
    build_heldout_kb
stage eval eval \
    evaluate --num-examples "$EVAL_EXAMPLES" --max-new-tokens "$EVAL_MAX_NEW_TOKENS"
stage transfer transfer \
    transfer "$TRANSFER_QUESTIONS" "$TRANSFER_SETS" "$LONG_SETS"
if [ "$RETRIEVER_STEPS" -gt 0 ]; then
    stage retriever retriever \
        retriever
fi
stage report report \
    "$PY" -m scripts.report --run-dir "$RUN_DIR" --model-tag "$TAG" --mode "$MODE" --nproc "$NPROC"

# =================================================================================================
# Where things are, and how to talk to the model
# =================================================================================================
QUESTION=$(head -n 1 "$RUN_DIR/kb/world/heldout_qa_2hop.jsonl" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['question'])")
cat <<EOF

speedrun: finished in $((SECONDS - T_START))s (this invocation)
  report:  $SHOW_DIR/report.md   (plots in $SHOW_DIR/report/)
  logs:    $SHOW_DIR/logs/

Chat with the RL model over the held-out knowledge base (run from $PWD):
  NANOCHAT_BASE_DIR=$SHOW_DIR $PY -m scripts.chat_cli --source rl --model-tag $TAG --kb $SHOW_DIR/kb/heldout -p "$QUESTION"
  NANOCHAT_BASE_DIR=$SHOW_DIR $PY -m scripts.chat_cli --source rl --model-tag $TAG --kb $SHOW_DIR/kb/heldout
  NANOCHAT_BASE_DIR=$SHOW_DIR $PY -m scripts.chat_web --source rl --model-tag $TAG --kb $SHOW_DIR/kb/heldout   # http://127.0.0.1:8000
EOF

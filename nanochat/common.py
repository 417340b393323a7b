"""
Small shared utilities: device and distributed setup, rank-0 printing, the base
directory for artifacts, a null-object wandb, and the one-line error for users.
"""
import os
import sys
import json

import torch
import torch.distributed as dist


def get_base_dir():
    """Where every artifact lives (tokenizer, checkpoints, data). $NANOCHAT_BASE_DIR wins. The default is
    not karpathy/nanochat's ~/.cache/nanochat: its checkpoints mean other ids (scripts.import_nanochat)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat-rag")
    os.makedirs(base, exist_ok=True)
    return base


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def sum_over_ranks(values, device):
    """Element-wise sum of a list of numbers over all DDP ranks (the list itself without DDP)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_ddp():
        dist.all_reduce(t)
    return t.tolist()


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type=""):
    """Set up the device and (under torchrun) the process group. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        die(f"--device-type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        die("--device-type cuda requested but CUDA is not available")
    ddp, rank, local_rank, world_size = get_dist_info()
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_ctx(device):
    """bf16 autocast on CUDA devices that support it; a no-op elsewhere (CPU bf16 is slower than fp32)."""
    import contextlib
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DummyWandb:
    """Stands in for a wandb run when --run=dummy or on non-zero ranks."""
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name, project, config, master_process):
    if run_name == "dummy" or not master_process:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        die("wandb is not installed: `pip install wandb`, or pass --run dummy")
    return wandb.init(project=project, name=run_name, config=config)


class UserError(ValueError):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def die(message, code=2):
    """Print a one-line error and exit. Scripts call this for bad flags, files and checkpoints."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def atomic_write_text(path, text):
    """Write a text file through a temp name so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))

"""Where model files come from: local hub-style directories, the Hugging Face Hub, the cache.
A model is a directory laid out like a hub snapshot (`config.json`, `model.safetensors` or its
shards, `tokenizer.json`), read with `load_state_dict` and checked key by key. What is made once
and cached is written atomically (`atomic`) under a lock processes take in turn (`exclusive`)."""
import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from errors import InputError

# --dtype names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in DTYPES; the one place dtype names are read."""
    if name not in DTYPES:
        raise InputError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextmanager
def atomic(path: Path):
    """Yield a temporary path beside `path` (a file or a directory) that replaces it in one step
    when the block ends without an error; the name holds the process id, so processes writing one
    file (run.json) each replace it whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def made_once(path: Path, what: str, make) -> Path:
    """`path` (a file or a directory under the cache), made by `make(tmp)` the first time and reused
    after: the first process to take its lock makes it atomically, the others wait and find it."""
    path = Path(path)
    with exclusive(cache_dir() / "locks" / f"{path.name}.lock", what):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic(path) as tmp:
                make(tmp)
        else:
            print(f"{what}: cached {path}")
    return path


@contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive lock on the file `path` for the block, waiting for another holder.
    flock: the kernel releases it with its process however that ends, so no lock outlives a
    crash; across machines it needs a file system whose flock reaches all hosts (NFS v4, Lustre
    -o flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: another process holds {path}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# "name" or "owner/name": letters, digits, "-", "_", "." (not first); "--" and ".." are the Hub's
# separators
_REPO_ID = re.compile(r"(?!.*(--|\.\.))([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def cache_dir() -> Path:
    """Where converted embedded models and trained task base models live ($CDCDA_CACHE)."""
    return Path(os.environ.get("CDCDA_CACHE", Path.home() / ".cache" / "cdcda"))


def snapshot(source: str) -> Path:
    """A local directory for `source`: an existing directory, or a hub repo id ("owner/name", or a
    legacy bare name such as "roberta-large", which the Hub caches under its own name), resolved by
    `huggingface_hub.snapshot_download` (offline too, from a warm cache); else an error naming the
    repo and what to do instead."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _REPO_ID.fullmatch(source):
        raise InputError(f"model {source!r}: not a directory and not a hub repo id "
                         "(owner/name, or a legacy bare name such as roberta-large)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as e:  # offline, gated, not found: all end the same way for the user
        raise InputError(
            f"model {source!r} could not be fetched from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e}). Download it where the Hub is reachable "
            f"(`huggingface-cli download {source} --local-dir DIR`) and pass DIR instead, "
            f"or use the embedded default model."
        ) from None


def load_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing (a model directory needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: `model.safetensors`, or the shards of its index."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise InputError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise on a missing key, an unexpected key or a shape mismatch, naming key and shapes."""
    expected = module.state_dict()
    for what, keys, shapes in (("missing key", set(expected) - set(state), expected),
                               ("unexpected key", set(state) - set(expected), state)):
        if keys:
            key, more = sorted(keys)[0], f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            label = "expected shape" if shapes is expected else "shape"
            raise InputError(f"{where}: {what} {key!r} ({label} {tuple(shapes[key].shape)}){more}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(f"{where}: key {key!r} has shape {tuple(state[key].shape)} in the "
                             f"checkpoint but the model expects {tuple(tensor.shape)}")

"""Models a user can name: `lfm list` (the demo, Hub models in the local cache, presets) and `lfm pull HUB_ID`
(`ollama pull` / `hf download`: fetch a checkpoint into the Hugging Face cache, with progress bars).

Pulled models live in huggingface_hub's own cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub), the one
`lfm chat HUB_ID`, transformers and vLLM read, so a model is downloaded once for all of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# what lfm reads from a checkpoint repository (checkpoint.resolve downloads the same)
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
LFM_MODEL_TYPES = ("lfm2", "lfm2_moe")


class PullError(ValueError):
    """A download that cannot happen (offline, unknown repository): one line for the user."""


@dataclass
class CachedModel:
    repo_id: str
    size_bytes: int
    path: Path  # the newest snapshot
    kind: str  # "checkpoint" (config.json of an LFM2 model) or "gguf"


def fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _model_type(snapshot: Path) -> str | None:
    try:
        return json.loads((snapshot / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """LFM2 checkpoints and GGUF repositories in the Hugging Face cache (other models there are not lfm's)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        snap = Path(newest.snapshot_path)
        if _model_type(snap) in LFM_MODEL_TYPES:
            kind = "checkpoint"
        elif any(f.file_name.endswith(".gguf") for f in newest.files):
            kind = "gguf"
        else:
            continue
        found.append(CachedModel(repo.repo_id, repo.size_on_disk, snap, kind))
    return sorted(found, key=lambda m: m.repo_id.lower())


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_text(cache_dir: str | Path | None = None) -> str:
    """The `lfm list` table: name, size, where; then the preset shapes."""
    from .model.checkpoint import DEMO_MODEL
    from .model.presets import PRESETS

    rows = []
    if (DEMO_MODEL / "config.json").is_file():
        rows.append(("demo", fmt_size(dir_size(DEMO_MODEL)), "built in: 6M-parameter LFM2, offline (the default)"))
    for m in cached_models(cache_dir):
        rows.append((m.repo_id, fmt_size(m.size_bytes), f"Hub cache{' (GGUF files)' if m.kind == 'gguf' else ''}"))
    w = max(len(r[0]) for r in rows + [("NAME", "", "")])
    lines = [f"{'NAME':{w}}  {'SIZE':>9}  WHERE"] + [f"{n:{w}}  {s:>9}  {where}" for n, s, where in rows]
    if len(rows) <= 1:
        lines.append("(no Hub models cached yet: lfm pull LiquidAI/LFM2.5-350M)")
    lines += ["", "presets (shapes without weights, for lfm info / init / bench): " + ", ".join(PRESETS)]
    return "\n".join(lines)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download (or bring up to date) a checkpoint's files into the Hub cache, with huggingface_hub's progress bars;
    the local snapshot directory. Offline or unknown: PullError with one line saying what to do."""
    from .model.checkpoint import _hub_reachable, _is_hub_id

    if not _is_hub_id(repo_id):
        raise PullError(f"{repo_id!r} is not a Hugging Face Hub id (OWNER/NAME, e.g. LiquidAI/LFM2.5-350M)")
    from huggingface_hub import snapshot_download

    if _offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub is not reachable from this machine"
        try:  # already there: say so, and where
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                          local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the one-line error below
            fix = "unset HF_HUB_OFFLINE" if _offline() else "connect this machine"
            raise PullError(f"cannot download {repo_id}: {why}. {fix[0].upper() + fix[1:]}, or copy the checkpoint "
                            "directory here and name its path instead") from None
        print(f"{why}; {repo_id} is already in the cache: {path}")
        return path
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as e:  # noqa: BLE001 - unknown / gated repository, network failure: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PullError(f"could not download {repo_id}: {type(e).__name__}: {first}") from None

"""Model ids: `nvidia/audio-flamingo-3-hf` wherever a checkpoint folder is accepted.

    model_folder(name, revision=None)   a folder as it is; a hub id -> its snapshot folder in the standard
                                        Hugging Face cache, downloaded first when it is not there

A name that is an existing folder is that folder. Otherwise a name of the form `owner/name` is a model id,
resolved by huggingface_hub (installed with tokenizers) into its cache ($HF_HUB_CACHE, by default
~/.cache/huggingface/hub), with its progress bars, `revision=` (a branch, tag or commit), and its files
downloaded whole before they appear in the snapshot: a download that stops half way leaves no partial file
there, and the next call resumes it. With HF_HUB_OFFLINE=1 nothing is downloaded and a complete cached copy
is used as it is. Everything else is a CheckpointError that names the id and the cause.

Only the files minaf3 reads are fetched (weights, configs, tokenizer, chat template, the think/ adapter),
not the repository's READMEs and images.
"""

import os
import re
from pathlib import Path

from minaf3.errors import CheckpointError

# owner/name as the hub spells ids: letters, digits, '-', '_', '.'; no '..' and no leading or trailing '.'.
MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "think/*", "llm/*", "sound_tower/*",
         "sound_mm_projector/*"]  # fmt: skip


def is_model_id(name: str) -> bool:
    """Whether `name` has the form of a hub model id (owner/name) rather than of a path."""
    return bool(MODEL_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def offline() -> bool:
    """HF_HUB_OFFLINE set to a true value, read at each call (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_folder(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of `name`: the folder itself, or a hub id's snapshot (see the module docstring).

    Raises CheckpointError when an id cannot be had: offline and not cached, not on the hub, a revision
    that does not exist, or a failed download. A name that is neither a folder nor an id is returned as a
    Path, for the caller's own "no such model folder" error.
    """
    path = Path(name)
    if path.is_dir() or not is_model_id(str(name)):
        if revision is not None and not is_model_id(str(name)):
            raise CheckpointError(f"{name}: revision={revision!r} applies to hub model ids, not to folders")
        return path
    from huggingface_hub import errors, snapshot_download

    repo = str(name)
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=FILES, local_files_only=offline())
    except errors.LocalEntryNotFoundError:
        where = f"the Hugging Face cache ({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')})"
        why = "HF_HUB_OFFLINE=1 forbids downloading" if offline() else "the hub could not be reached"
        raise CheckpointError(
            f"{repo}: not in {where} and {why}; download it where there is a network "
            f"(huggingface-cli download {repo}) or pass a local folder"
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such model on the Hugging Face hub (or it is private)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo}: revision {revision!r} not found on the Hugging Face hub") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as error:
        raise CheckpointError(f"{repo}: download failed ({type(error).__name__}: {error})") from None
    return Path(folder)

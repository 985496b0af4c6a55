"""A Hugging Face Hub cache written by a test: a saved folder served as a repository, offline.

``huggingface_hub`` keeps a downloaded repository as
``<cache>/models--<owner>--<name>/snapshots/<commit>/<files>`` with
``refs/main`` naming the commit. Loading ``"<owner>/<name>"`` with
``cache_dir=<cache>, local_files_only=True`` then takes the Hub code path (a
repository id, not a directory) without a network.
"""

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The cached revision: any 40 hex digits."""

OFFLINE = {"local_files_only": True}
"""The loading argument that keeps ``huggingface_hub`` off the network."""


def cache_repository(cache: Path, repo_id: str, folder: Path) -> dict[str, object]:
    """Put ``folder`` into ``cache`` as the main revision of ``repo_id``; return the loading arguments."""
    owner, name = repo_id.split("/")
    repository = cache / f"models--{owner}--{name}"
    shutil.copytree(folder, repository / "snapshots" / COMMIT)
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(COMMIT)
    return {"cache_dir": str(cache), **OFFLINE}

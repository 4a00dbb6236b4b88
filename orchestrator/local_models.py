"""Model ids that name a folder on this machine, told apart from hub ids without a hub call.

An id is taken for a local path when it starts with `./`, `../`, `/` or `~`, when it exists on
disk, or when its first segment is a local folder (`models/binding-tinyy`, with `models/` here).
Such an id is checked on disk alone: a typo fails at once with the folder named, instead of
spending tens of seconds on hub retries for a repository that cannot exist.
"""

from pathlib import Path

__all__ = ["local_problem", "looks_local"]


def looks_local(name: str) -> bool:
    """Whether `name` reads as a path on this machine rather than a hub id (`org/name`)."""
    if name.startswith((".", "/", "~")):  # ./, ../, an absolute path, a home path
        return True
    path = Path(name).expanduser()
    if path.exists():
        return True
    first = Path(name).parts[0] if Path(name).parts else ""
    return len(Path(name).parts) > 1 and Path(first).is_dir()


def local_problem(name: str) -> str | None:
    """What is wrong with `name` as a local model folder, or None when it is one (or when it is
    not a local-looking id at all, and is left to the hub)."""
    if not looks_local(name):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return f"no such folder {path} (the id reads as a local path, so the hub is not asked)"
    if not (path / "config.json").is_file():
        return f"{path} is not a folder with a config.json"
    return None

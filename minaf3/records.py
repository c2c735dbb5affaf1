"""Records on disk of a batch run: one JSON line per finished item, appended by each rank, merged at the end.

    OUT.parts/rank-00003.jsonl   what rank 3 finished: {"id": ..., "text": ...} or {"id": ..., "error": ...},
                                 flushed and fsync'd after every batch (PartWriter)
    OUT                          every record in manifest order, written atomically by `merge`, which then
                                 removes OUT.parts/

`read_records` reads both, so a re-run knows which ids are done; a torn last line (a write cut by a kill)
is ignored, and a text beats an earlier error for the same id.

    OUT.settings.json            what made the records (model, adapter, decoding...), for runs that reuse
                                 OUT across invocations (`minaf3 eval`): `check_settings` refuses to mix two
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from minaf3.errors import ConfigError
from minaf3.manifest import Item

logger = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"  # OUT.parts/rank-00003.jsonl: what rank 3 finished
SETTINGS_SUFFIX = ".settings.json"


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def _lines(path: Path) -> list[dict]:
    """The complete JSON lines of a record file; a last line without its newline is a torn write, dropped."""
    data = path.read_bytes()
    records = []
    for line in data.split(b"\n")[:-1]:  # the last piece is "" after a final newline, else the torn tail
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not a record (a damaged or foreign line): its item, if any, runs again
        if isinstance(record, dict) and ("text" in record or "error" in record):
            if isinstance(record.get("id"), str | int):  # the types a manifest id can have
                records.append(record)
    return records


def read_records(out: Path) -> dict[Any, dict]:
    """Every result recorded so far, by id: the merged output first, then each rank's part file.

    A text beats an error (an error retried with success); otherwise the later record wins. Two texts for
    one id in the part files cannot happen (each id is dealt to one rank, and done ids are skipped), so they
    mean two jobs share OUT: a ConfigError rather than a silent pick.
    """
    sources = [out] if out.is_file() else []
    parts = parts_dir(out)
    sources += sorted(parts.glob("rank-*.jsonl")) if parts.is_dir() else []
    records: dict[Any, dict] = {}
    texts_in_parts: set = set()
    for source in sources:
        for record in _lines(source):
            key, old = record["id"], records.get(record["id"])
            if "text" in record and source != out:
                if key in texts_in_parts:
                    raise ConfigError(
                        f"{source}: a second result for id {key!r}; do two jobs write --out {out}?"
                    )
                texts_in_parts.add(key)
            if old is None or "error" in old or "text" in record:
                records[key] = record
    return records


class PartWriter:
    """Appends to one rank's part file; each `write` is on disk (flushed and fsync'd) when it returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+b")  # noqa: SIM115 - held for the run, closed by close()
        self.file.seek(0)  # reads start where asked; writes in append mode still go to the end
        data = self.file.read()
        if data and not data.endswith(b"\n"):  # a torn last line: cut, or the next record is glued to it
            self.file.truncate(data.rfind(b"\n") + 1)

    def write(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.file.write(data.encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())  # a record counts as done on re-run: it must survive a power cut

    def close(self) -> None:
        self.file.close()


def merge(items: list[Item], out: Path) -> dict[str, int]:
    """Write OUT with one record per manifest item, in manifest order, then remove OUT.parts/.

    OUT is replaced atomically, so a crash here leaves the old OUT or the new one, and the parts stay until
    the new one is in place. Returns counts of texts and errors.
    """
    records = read_records(out)
    missing = [item.id for item in items if item.id not in records]
    if missing:  # every rank finished before the barrier: a missing result is a bug, not a user error
        raise RuntimeError(f"merge: {len(missing)} item(s) have no result, first {missing[0]!r}")
    dropped = len(records) - len(items)
    if dropped:
        logger.warning("%s: %d record(s) for ids no longer in the manifest are left out", out, dropped)
    # One line per manifest item, whose ids are unique (read_manifest): each id exactly once.
    lines = [json.dumps(records[item.id], ensure_ascii=False) + "\n" for item in items]
    staging = out.with_name(out.name + ".tmp")
    with open(staging, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, out)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    errors = sum("error" in records[item.id] for item in items)
    return {"items": len(items), "texts": len(items) - errors, "errors": errors}


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + SETTINGS_SUFFIX)


def check_settings(out: Path, settings: dict[str, Any], rank: int) -> None:
    """Refuse to add to the records of `out` if they were made with other `settings` (JSON values).

    A re-run reuses every record already in OUT and OUT.parts/; made by another model, adapter or decoding,
    they would mix two runs' answers without a trace. Every rank compares before any work, so a mismatch
    stops them all (ConfigError naming what differs); then rank 0 writes `settings` (atomically: the other
    ranks read the old file or the new one, never half of one). Records without a settings file (from
    `minaf3 batch`) are taken as they are.
    """
    path = settings_path(out)
    if path.is_file() and read_records(out):
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            before = {}  # damaged: nothing can be said to match
        before = before if isinstance(before, dict) else {}
        changed = [
            key for key in sorted(settings.keys() | before.keys()) if before.get(key) != settings.get(key)
        ]
        if changed:
            said = "; ".join(f"{key} {before.get(key)!r} then, {settings.get(key)!r} now" for key in changed)
            raise ConfigError(
                f"{out}: the answers recorded there were made with other settings ({said}); give another "
                f"output file, or delete {out} and {parts_dir(out)} to start again"
            )
    if rank == 0:
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, path)

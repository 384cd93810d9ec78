"""The JSONL records the stages exchange: seed tasks in, candidates between stages, Alpaca out.

Every reader checks each field and names the file, line and field of the first bad one, so a
run fails at once with a cause the user can fix instead of deep inside a stage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..runtime import storage
from ..runtime.context import StageError

ORIGINS = ("self-instruct", "isheep", "aitp")
_MISSING = object()
_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object", type(None): "null"}  # error messages speak JSON, the file's language


class RecordError(StageError):
    """A bad input record: "FILE:LINE: field 'x': what is wrong"."""


def _field(row: dict, name: str, where: str, kind: type | tuple[type, ...] = str,
           default: Any = _MISSING) -> Any:
    """row[name], checked to be of `kind`; `default` when absent (if given), else an error."""
    if name not in row or (row[name] is None and default is not _MISSING):
        if default is _MISSING:
            raise RecordError(f"{where}: field '{name}': missing")
        return default
    value = row[name]
    # bool is an int in Python; a JSON true where a number belongs is still an error.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        wanted = " or ".join(_JSON_NAMES[k] for k in _as_tuple(kind))
        raise RecordError(f"{where}: field '{name}': expected {wanted}, got {_json_name(value)}")
    return value


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _text(row: dict, name: str, where: str, default: Any = _MISSING, nonempty: bool = False) -> str:
    value = _field(row, name, where, str, default)
    if nonempty and not value.strip():
        raise RecordError(f"{where}: field '{name}': empty")
    return value


# --- seeds -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    id: str
    instruction: str
    input: str
    output: str
    is_classification: bool


def load_seeds(uri: str, output_required: bool = True) -> list[Seed]:
    """Seed tasks from JSONL, one task a line, in any of the three formats users bring:

    Self-Instruct {id?, name?, instruction, instances: [{input, output}, ...], is_classification?}
    (the first instance is the example), Alpaca {instruction, input?, output}, and chat
    {messages: [{role, content}, ...]} (the first user turn and the assistant reply after it).
    Without `output_required` (instruction sets measured by coverage) an output may be missing.
    """
    seeds: list[Seed] = []
    first_line: dict[str, int] = {}
    for line, row in storage.iter_jsonl(uri):
        where = f"{uri}:{line}"
        seed = _parse_seed(row, where, f"seed-{line}", "" if not output_required else _MISSING)
        if seed.id in first_line:
            raise RecordError(f"{where}: field 'id': {seed.id!r} repeats line {first_line[seed.id]}")
        first_line[seed.id] = line
        seeds.append(seed)
    if not seeds:
        raise RecordError(f"{uri}: no seed tasks: the file is empty")
    return seeds


def _parse_seed(row: dict, where: str, default_id: str, output_default: Any) -> Seed:
    raw_id = _field(row, "id", where, (str, int), default=None)
    seed_id = str(raw_id) if raw_id is not None else _text(row, "name", where, default=None) or default_id
    if "messages" in row:
        instruction, output = _first_exchange(row, where)
        return Seed(seed_id, instruction, "", output, False)
    instruction = _text(row, "instruction", where, nonempty=True).strip()
    is_classification = _field(row, "is_classification", where, bool, default=False)
    if "instances" in row:
        instances = _field(row, "instances", where, list)
        if not instances:
            raise RecordError(f"{where}: field 'instances': empty (a seed task needs one example)")
        first = instances[0]
        if not isinstance(first, dict):
            raise RecordError(f"{where}: field 'instances[0]': expected an object, got {_json_name(first)}")
        return Seed(seed_id, instruction, _text(first, "input", f"{where}: instances[0]", default=""),
                    _text(first, "output", f"{where}: instances[0]", default=output_default),
                    is_classification)
    return Seed(seed_id, instruction, _text(row, "input", where, default=""),
                _text(row, "output", where, default=output_default), is_classification)


def _first_exchange(row: dict, where: str) -> tuple[str, str]:
    messages = _field(row, "messages", where, list)
    user = assistant = None
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{at}: expected an object, got {_json_name(message)}")
        role = _text(message, "role", at)
        if role == "user" and user is None:
            user = _text(message, "content", at, nonempty=True).strip()
        elif role == "assistant" and user is not None:
            assistant = _text(message, "content", at)
            break
    if user is None:
        raise RecordError(f"{where}: field 'messages': no user turn")
    if assistant is None:
        raise RecordError(f"{where}: field 'messages': no assistant reply after the first user turn")
    return user, assistant


# --- candidates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One generated item with its provenance: a row of candidates.jsonl."""

    id: str
    instruction: str
    input: str
    output: str
    origin: str  # one of ORIGINS
    round: int
    model: str  # URI of the model that wrote it
    seed_ids: tuple[str, ...] = ()  # seeds shown in the prompt that produced the instruction
    source_doc_id: str | None = None  # AITP: the coverage-gap document it was rewritten from
    sampling: dict = field(default_factory=dict)  # decoding settings, for reproducibility

    def to_json(self) -> dict:
        return {**asdict(self), "seed_ids": list(self.seed_ids)}

    @classmethod
    def from_json(cls, row: dict, where: str) -> Candidate:
        """Parse a row read at `where` ("FILE:LINE"); a bad field raises RecordError naming it."""
        origin = _text(row, "origin", where)
        if origin not in ORIGINS:
            raise RecordError(f"{where}: field 'origin': {origin!r} is not one of {', '.join(ORIGINS)}")
        seed_ids = _field(row, "seed_ids", where, list, default=[])
        if not all(isinstance(s, str) for s in seed_ids):
            raise RecordError(f"{where}: field 'seed_ids': expected a list of strings")
        return cls(
            id=_text(row, "id", where, nonempty=True),
            instruction=_text(row, "instruction", where),
            input=_text(row, "input", where, default=""),
            output=_text(row, "output", where),
            origin=origin,
            round=_field(row, "round", where, int),
            model=_text(row, "model", where),
            seed_ids=tuple(seed_ids),
            source_doc_id=_field(row, "source_doc_id", where, str, default=None),
            sampling=_field(row, "sampling", where, dict, default={}),
        )


def read_candidates(uri: str) -> list[Candidate]:
    return [Candidate.from_json(row, f"{uri}:{line}") for line, row in storage.iter_jsonl(uri)]


# --- plain instruction data ----------------------------------------------------------------------

def to_alpaca(instruction: str, input: str, output: str) -> dict:
    """The row LLaMA-Factory and most SFT tools read."""
    return {"instruction": instruction, "input": input, "output": output}


def read_instruction_file(uri: str) -> list[dict]:
    """JSONL rows with a string `instruction` (and string `input`/`output` when present), unchanged."""
    rows = []
    for line, row in storage.iter_jsonl(uri):
        where = f"{uri}:{line}"
        _text(row, "instruction", where)
        for name in ("input", "output"):
            _text(row, name, where, default="")
        rows.append(row)
    return rows

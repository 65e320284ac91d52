"""User prompt pairs: the text format, JSON and CSV files (generated pairs: pairs.py).

    pairs = load_pairs_file("my_pairs.txt")    # lines "unsafe prompt | safe prompt"
    pairs = parse_pairs_text("a red circle | a red square")
    text = pairs_to_text(pairs)                # the same text format back

Text format (parse_pairs_text / pairs_to_text): one pair per line, `unsafe | safe` (a tab or ` => `
also separates); exactly one separator per line; `#` starts a comment (to the end of the line);
blank lines are ignored; surrounding whitespace is stripped. A line with the same prompt on both
sides (`a red square | a red square`) is a keep pair (see retain_pairs). Prompts in this format therefore
cannot contain `|`, `=>`, tabs, `#` or line breaks (JSON/CSV files can).
"""
import csv
import difflib
import io
import json
import re
from pathlib import Path

from .. import paths
from .pairs import MAX_PAIRS, MAX_PAIRS_FILE_BYTES, PromptPair, normalise_names, prompt_words

_SEPARATORS = ("\t", "=>", "|")  # text-format separators, each allowed exactly once per line
_SEPARATOR_DISPLAY = "'unsafe prompt | safe prompt' (or a tab or ' => ' between the two)"


# ----------------------------------------------------------------------------- user pairs

def infer_concept_anchor(unsafe: str, safe: str) -> tuple[str, str]:
    """The words that differ between the two prompts: ('church', 'house') for
    'a photo of a church' / 'a photo of a house'. ('', '') when nothing differs."""
    a, b = unsafe.split(), safe.split()
    concept, anchor = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            concept += a[i1:i2]
            anchor += b[j1:j2]
    return " ".join(concept), " ".join(anchor)


def _short(value, limit: int = 120) -> str:
    """repr for messages, cut so a huge bad entry cannot flood the screen."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _user_pair(unsafe, safe, where: str, default_concept: str | None,
               concept=None, anchor=None) -> PromptPair:
    if not isinstance(unsafe, str) or not isinstance(safe, str):
        raise ValueError(f"{where}: unsafe and safe prompts must be strings, got "
                         f"{_short(unsafe)} and {_short(safe)}")
    unsafe, safe = unsafe.strip(), safe.strip()
    for label, prompt in (("unsafe", unsafe), ("safe", safe)):
        if not prompt:
            raise ValueError(f"{where}: the {label} prompt is empty; expected {_SEPARATOR_DISPLAY}")
    if " ".join(unsafe.casefold().split()) == " ".join(safe.casefold().split()):
        return PromptPair(unsafe=unsafe, safe=unsafe, concept="", anchor="")   # a keep pair
    inferred_concept, inferred_anchor = infer_concept_anchor(unsafe, safe)
    concept = concept if isinstance(concept, str) and concept.strip() else \
        (default_concept if default_concept else inferred_concept)
    anchor = anchor if isinstance(anchor, str) and anchor.strip() else inferred_anchor
    return PromptPair(unsafe=unsafe, safe=safe, concept=concept.strip(), anchor=anchor.strip())


def parse_pairs_text(text: str, default_concept: str | None = None) -> list[PromptPair]:
    """Pairs from the text format (module docstring). The concept of each pair is default_concept
    or, without one, the words of the unsafe prompt that differ from the safe one."""
    if not isinstance(text, str):
        raise ValueError(f"pairs text must be a string, got {type(text).__name__}")
    if default_concept is not None and not isinstance(default_concept, str):
        raise ValueError(f"default_concept must be a string or None, got {default_concept!r}")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        found = [sep for sep in _SEPARATORS for _ in range(line.count(sep))]
        if len(found) != 1:
            what = "no separator" if not found else f"{len(found)} separators"
            raise ValueError(f"line {number}: {what} in {line.strip()!r}; expected exactly one "
                             f"pair per line as {_SEPARATOR_DISPLAY}")
        unsafe, safe = line.split(found[0])
        pairs.append(_user_pair(unsafe, safe, f"line {number}", default_concept))
    return pairs


def _check_writable(prompt: str, index: int) -> None:
    problems = [sep for sep in ("|", "=>", "\t", "#") if sep in prompt]
    if prompt.splitlines() != [prompt]:
        problems.append("a line break")
    if prompt != prompt.strip() or not prompt:
        problems.append("surrounding whitespace" if prompt else "nothing")
    if problems:
        raise ValueError(f"pair {index}: prompt {prompt!r} contains {problems}, which the text "
                         "format cannot hold; save the pairs as JSON instead")


def pairs_to_text(pairs: list[PromptPair]) -> str:
    """The text format: one 'unsafe | safe' line per pair (parse_pairs_text reads it back)."""
    lines = []
    for i, pair in enumerate(pairs):
        _check_writable(pair.unsafe, i)
        _check_writable(pair.safe, i)
        lines.append(f"{pair.unsafe} | {pair.safe}")
    return "".join(line + "\n" for line in lines)


# ----------------------------------------------------------------------------- files

_UNSAFE_KEYS = ("unsafe", "unsafe_prompt", "original_prompt")  # the last two: S-VARE's JSON
_SAFE_KEYS = ("safe", "safe_prompt", "modified_prompt")


def _pick(entry: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if key in entry:
            return entry[key]
    raise ValueError(f"{where}: missing the key/column {keys[0]!r} (also accepted: {keys[1:]}); "
                     f"found {sorted(entry)}")


def _pair_from_record(entry, where: str, default_concept: str | None) -> PromptPair:
    if isinstance(entry, dict):
        return _user_pair(_pick(entry, _UNSAFE_KEYS, where), _pick(entry, _SAFE_KEYS, where),
                          where, default_concept, entry.get("concept"), entry.get("anchor"))
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return _user_pair(entry[0], entry[1], where, default_concept)
    raise ValueError(f"{where}: expected {{\"unsafe\": ..., \"safe\": ...}} or "
                     f"[unsafe, safe], got {_short(entry)}")


def load_pairs_file(path, default_concept: str | None = None) -> list[PromptPair]:
    """Pairs from a .txt (text format), .json (list of {"unsafe", "safe"} objects or
    [unsafe, safe] lists) or .csv (header with unsafe and safe columns) file.

    default_concept (one name, or several separated by commas) must occur in at least one
    unsafe prompt (check_concept_present): pairs that never show it cannot erase it."""
    path = Path(path)
    if default_concept is not None and not isinstance(default_concept, str):
        raise ValueError(f"default_concept must be a string or None, got {default_concept!r}")
    if paths.file_kind(path) == "missing":
        raise FileNotFoundError(f"pairs file not found: {path}")
    paths.require_regular_file(path, "pairs file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".csv"):
        raise ValueError(f"pairs file {path}: unsupported extension {suffix!r}; use .txt "
                         "('unsafe | safe' lines), .json or .csv")
    size = path.stat().st_size
    if size > MAX_PAIRS_FILE_BYTES:
        raise ValueError(f"pairs file {path} is {size / 2**20:.0f} MiB; at most "
                         f"{MAX_PAIRS_FILE_BYTES // 2**20} MiB ({MAX_PAIRS} pairs) are read")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"pairs file {path} is not UTF-8 text ({err})") from None
    try:
        if suffix == ".txt":
            pairs = parse_pairs_text(text, default_concept)
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON at line {err.lineno}: {err.msg}") from None
            except RecursionError:   # json gives up on very deep nesting
                raise ValueError("JSON nested too deeply; expected a flat list of pairs") from None
            if not isinstance(data, list):
                raise ValueError("expected a JSON list of pairs at the top level")
            pairs = [_pair_from_record(entry, f"entry {i}", default_concept)
                     for i, entry in enumerate(data)]
        else:
            reader = csv.DictReader(io.StringIO(text))
            pairs = [_pair_from_record({k.strip().lower(): v for k, v in row.items() if k},
                                       f"row {reader.line_num}", default_concept)
                     for row in reader]
    except (ValueError, csv.Error) as err:
        raise ValueError(f"pairs file {path}: {err}") from None
    if not pairs:
        raise ValueError(f"pairs file {path} holds no pairs")
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"pairs file {path} holds {len(pairs)} pairs; at most {MAX_PAIRS} (every safe "
                         "prompt is sampled once before training): split it or sample a subset")
    if default_concept and default_concept.strip():
        for concept in normalise_names(default_concept, "concepts"):
            if not check_concept_present(pairs, concept):
                raise ValueError(f"pairs file {path}: the concept {concept!r} occurs in none of its "
                                 f"{len(pairs)} unsafe prompts, so training would not erase it; name "
                                 "the concept the unsafe prompts contain, or leave it out to infer "
                                 "it from each pair")
    return pairs


def check_concept_present(pairs: list[PromptPair], concept: str) -> bool:
    """True when the concept (case-insensitive, whole words, plural s/es allowed) occurs in at
    least one unsafe prompt. False means the pairs probably do not erase it: warn the user."""
    words = prompt_words(concept)
    if not words:
        return False
    pattern = re.compile(r"(?<![\w'])" + r"\s+".join(map(re.escape, words)) + r"(?:e?s)?(?![\w'])")
    return any(pattern.search(pair.unsafe.lower()) for pair in pairs)

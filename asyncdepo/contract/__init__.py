"""The contract between the engine and the adapters: what each side may rely on.

Both sides import this package and nothing of each other (the model is rclone's ``fs/``). It holds (the
value types in :mod:`~asyncdepo.contract.values`, the interface in :mod:`~asyncdepo.contract.adapter`):

* the value types that cross the line — :class:`Item` (a file found by the walk), :class:`Chunk` (one request
  body read into a reserved buffer), :class:`ByteSource` (one streamed body), :class:`Part` (a part handed
  over as a stream, with its digests), :class:`PartInfo`,
  :class:`RemoteItem` (a file listed for a pull) and :class:`PlainGet` (a pull item fetched by plain GET);
* :class:`Features` — what an archive can do, the only thing the engine reads to decide how to send;
* :class:`ChunkWriter` and :class:`Adapter` — the interface an archive implements;
* :class:`SessionWriter` / :class:`SessionReader` with :class:`SessionPlan` / :class:`FetchPlan` and
  :class:`SessionProgress` — for transports where one session moves many files (see "Sessions" below);
* :func:`register` and :data:`REGISTRY` — URL schemes to adapter factories (``asyncdepo.adapters`` loads the
  built-in ones).

Buffers: ``Chunk.data`` is valid only until the writer's ``write``/``write_part`` call returns (the buffer is
reused), so an adapter that needs the bytes later must copy them; each view a ByteSource yields is valid until
the next one is requested, and a body class must not hand a view to a transport that may still hold it after
that (see :mod:`asyncdepo.transport.httpbody`).

An adapter translates a job into one archive's API. The engine never branches on an adapter's name or
type; what differs between archives is declared in :class:`Features`, and the engine reads those.

Push, per item, the engine picks one of three modes from the features:

* **multipart** (``features.multipart`` and the item is larger than one chunk): the engine reads the
  file in order into reserved buffers, hashes them, and hands each to ``writer.write_part`` — several
  parts of one file may be in flight at once, in any order. Parts already in ``writer.parts`` are skipped.
  With ``features.part_streams`` (and no ``--compress``) no part is held in memory: the engine reads the
  file in order once to hash it (whole-file digests, and each part's ``chunk_digests``), a few parts ahead
  of the sends, and hands each part to ``writer.write_part_stream(part, source)`` as a :class:`Part` (its
  number, range and digests, known before its request starts, e.g. for a checksum header) and a
  ByteSource that reads the range again when the request sends it (from the page cache: the hashing pass
  is at most ``transfers + 1`` parts ahead). Each attempt gets a fresh source. Whole-file digests that are
  CRCs the adapter also asked per part (``digests.COMBINABLE``) are composed from the parts' values, not
  hashed again. A resumed part in ``writer.parts`` is sent again when its journaled ``digests`` differ from
  the ones just computed (the file changed there, or the target holds other bytes).
* **chunked** (``features.chunked``, or multipart with a file that fits in one chunk): chunks are sent
  in order with ``writer.write``, starting at ``writer.confirmed`` (the offset the server confirmed).
* **stream** (neither): one ``writer.write_stream(source)`` with the whole file as a ByteSource.

After the last byte, ``writer.complete(digests, size)`` finalises the item and compares the digest the
server reports with ``digests`` (computed while reading), raising IntegrityError on a mismatch.

Sessions (``features.sessions`` for pushes, ``features.pull_sessions`` for pulls): some transports move a
batch of files in one session — an ascp run over a ``--file-pair-list``, a Globus transfer task — and their
cost is per session, not per file. For those the engine, still knowing no archive, groups the items of the walk
(or of the listing) into sessions bounded by ``features.session_items`` files and ``features.session_bytes``
bytes, never mixing two values of :meth:`Adapter.session_group`, and runs up to ``min(transfers,
max_concurrency)`` sessions at once, each through the pacer:

* push: ``prepare([])`` once before the first session (the job-level start: create an entry, upload a
  thumbnail; what it raises ends the job, and ``job_state()`` is journaled right after), then per session
  ``open_session(plan)`` and ``writer.send(progress)``; ``finish(ok)`` at the end (grant rights, submit).
* pull: ``open_fetch_session(plan)`` and ``reader.fetch(progress)``; the adapter writes each file's bytes to
  its ``Fetch.part`` (continuing what the part already holds, as the transport can); the engine checks size and
  published digests after ``done`` and renames the part into place (the adapter never touches the final name).

The session reports per item as it goes, through :class:`SessionProgress` (synchronous, quick; callable from a
transport's progress callback): ``moved(rel, n)`` counts bytes (``rel`` ``""`` when the transport only knows a
session total), ``done(rel, state)`` and ``failed(rel, error)`` settle one item (the engine journals each at
once, counts it in the statistics and emits its event), ``await note(state)`` journals resume state for every
item of the session not yet done (e.g. a Globus task id) and returns once it is committed. Outcomes:

* ``send``/``fetch`` returns: every item of the plan not reported ``failed`` is complete on the far side (an
  item the transport found already there counts as complete);
* it raises: items reported ``done`` stay done, the others take that error. An AuthError ends the job (no
  session can succeed with refused credentials); another permanent error fails those items; a transient one
  makes the engine open a new session, through the pacer, for the items still open (``config.request_attempts``
  sessions in all; ``plan.last_try`` tells the adapter that no further session follows in this run, so it may
  take a fallback route). A transient ``failed(rel, error)`` is retried the same way; an item whose published
  digest differed twice is not fetched again.
* ``plan.rate`` is the session's share of ``--bwlimit`` (bytes/s; None: no limit): the transport enforces it
  (ascp ``-l``), or the adapter documents that it cannot.

Memory stays flat in the number of files: at most ``transfers + 2`` batches of ``session_items`` items exist
at once.

Retries: an adapter makes one attempt per call and raises from the ``asyncdepo.errors`` tree; the engine
retries transient errors (per request with backoff, per item by reopening with the journaled state, per
run). ``write``/``write_part`` must be idempotent for the same chunk: the engine may resend a chunk
whose response was lost, after calling ``writer.resync()`` to learn the server's offset.

Secrets: an adapter keeps credentials to itself; ``describe()`` and ``state()`` must not contain any.

Adapters import this module, :mod:`asyncdepo.transport` and the engine's facade :mod:`asyncdepo.engine.api`;
never the engine's internals.
"""


from asyncdepo.contract.adapter import (
    REGISTRY,
    Adapter,
    AdapterFactory,
    ChunkWriter,
    Features,
    SessionReader,
    SessionWriter,
    register,
)
from asyncdepo.contract.values import (
    ByteSource,
    Chunk,
    Fetch,
    FetchPlan,
    Item,
    Part,
    PartInfo,
    PlainGet,
    RemoteItem,
    SessionPlan,
    SessionProgress,
)

__all__ = [
    "REGISTRY", "Adapter", "AdapterFactory", "ByteSource", "Chunk", "ChunkWriter", "Features", "Fetch",
    "FetchPlan", "Item", "Part", "PartInfo", "PlainGet", "RemoteItem", "SessionPlan", "SessionProgress",
    "SessionReader", "SessionWriter", "register",
]

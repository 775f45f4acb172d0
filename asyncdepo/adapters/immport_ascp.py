"""ImmPort's ascp route as engine sessions: one ascp receive over a ``--file-pair-list`` per batch of files.

:meth:`ImmportAdapter.open_fetch_session <asyncdepo.adapters.immport.ImmportAdapter.open_fetch_session>` asks
ImmPort for an Aspera token covering exactly the session's paths and hands it, with the plan, to
:class:`AscpFetch`. Each pair is the file's ImmPort path and its part file under OUTDIR (relative to it); ascp
runs with ``-k 2`` so a part it started resumes, and reports each file done as it completes; the engine then
checks size and md5 against the manifest and renames the part into place. ``-l`` is the lower of ``--rate``
and the session's share of ``--bwlimit``.
"""

from __future__ import annotations

import dataclasses

from asyncdepo.contract import FetchPlan, SessionProgress, SessionReader
from asyncdepo.errors import PermanentError, TransientError
from asyncdepo.transport.ascp.options import AscpOptions, AscpSecrets
from asyncdepo.transport.ascp.pairs import Pair, capped_rate, pair_safe, run_pairs


class AscpFetch(SessionReader):
    """One ascp session fetching ``plan`` with the Aspera ``token`` (kept in ascp's environment only)."""

    def __init__(self, opts: AscpOptions, plan: FetchPlan, token: str, path_of: dict[str, str]) -> None:
        self.opts, self.plan, self._token, self.path_of = opts, plan, token, path_of

    def __repr__(self) -> str:  # never the token
        return f"AscpFetch({len(self.plan.fetches)} file(s))"

    async def fetch(self, progress: SessionProgress) -> None:
        pairs = []
        for f in self.plan.fetches:
            dest = f.part.relative_to(self.plan.root).as_posix()
            if pair_safe(dest):
                pairs.append(Pair(self.path_of[f.item.rel], dest, f.item.rel))
            else:
                progress.failed(f.item.rel, PermanentError(f"{f.item.rel!r}: ascp cannot name a path with a "
                                                           "line break; fetch it with --via https"))
        if not pairs:
            return
        opts = dataclasses.replace(self.opts, rate=capped_rate(self.opts.rate, self.plan.rate))

        def on_progress(rel: str, delta: int, done: bool) -> None:
            progress.moved(rel, delta)
            if done and rel:
                progress.done(rel)

        result = await run_pairs(opts, pairs, str(self.plan.root), secrets=AscpSecrets(token=self._token),
                                 on_progress=on_progress)
        if result.partial:
            raise TransientError("ascp reported a partial completion (some files failed)")

"""An item's error travels from a cluster's worker to its coordinator as plain data and comes back as the same
class, message, hint and attributes (so the coordinator handles a full disk or a vanished source as one node
does), through a pickle as Dask moves it."""

from __future__ import annotations

import pickle

from asyncdepo import errors
from asyncdepo.engine.cluster_wire import WireError
from asyncdepo.engine.report import describe


class _AdapterOwn(errors.TransientError):
    """An adapter's own subclass: it travels as the nearest class of the tree."""


def _round_trip(exc: BaseException) -> errors.DepoError:
    wire: WireError = pickle.loads(pickle.dumps(WireError.of(exc)))
    return wire.rebuild()


def test_disk_full_keeps_its_class_path_free_and_hint() -> None:
    err = _round_trip(errors.DiskFullError("no space left", path="/mnt/t", free=1234, hint="free some space"))
    assert type(err) is errors.DiskFullError
    assert (str(err), err.path, err.free, err.hint) == ("no space left", "/mnt/t", 1234, "free some space")
    assert not errors.is_transient(err)


def test_tree_classes_and_attributes() -> None:
    vanished = _round_trip(errors.SourceVanishedError("a.bin: source vanished"))
    assert type(vanished) is errors.SourceVanishedError and str(vanished) == "a.bin: source vanished"
    limited = _round_trip(errors.RateLimitedError("slow down", retry_after=2.5, status=429))
    assert type(limited) is errors.RateLimitedError and (limited.retry_after, limited.status) == (2.5, 429)
    assert errors.is_transient(limited)
    auth = _round_trip(errors.AuthError("refused", hint="check the password"))
    assert type(auth) is errors.AuthError and describe(auth) == "refused\n  hint: check the password"


def test_an_adapters_subclass_and_a_foreign_exception() -> None:
    own = _round_trip(_AdapterOwn("try later"))
    assert type(own) is errors.TransientError and str(own) == "try later"
    foreign = _round_trip(ValueError("bad value"))
    # described as one node describes it, and not retried
    assert type(foreign) is errors.DepoError and describe(foreign) == "ValueError: bad value"
    assert not errors.is_transient(foreign)
    grouped = _round_trip(BaseExceptionGroup("g", [errors.DiskFullError("full", path="/x")]))
    assert type(grouped) is errors.DiskFullError  # the leaf of a task group's error

"""The official gypsum-client (PyPI, 0.2.0) run unchanged against the gypsum simulator.

gypsum-client binds ``url=rest_url()`` as a default argument at import time, so every call passes
``url=`` explicitly; it resolves a token's user through GitHub's ``/user``, which the simulator answers
(``set_access_token(token, github_url=<simulator>)``). Its functions are synchronous (requests), so the
simulator runs in a thread of its own (ThreadedSim).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import requires

gpc = requires.module("gypsum_client")

from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.server import ThreadedSim

ADMIN, OWNER, UPLOADER = "fid-admin", "fid-owner", "fid-up"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedSim]:
    root = tmp_path_factory.mktemp("gypsum-sim")
    factory = lambda: gsim.create_app(
        root, identities={ADMIN: "root", OWNER: "olivia", UPLOADER: "ursula:lab"}, admins=["root"]
    )
    with ThreadedSim(factory) as server:
        yield server


def bucket(sim: ThreadedSim) -> Path:
    assert sim.server is not None
    return sim.server.app[gsim.STATE_KEY].bucket.root


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("..") and not p.name.endswith(".LOCK")}


def new_project(sim: ThreadedSim, name: str, **quota: int) -> None:
    gpc.create_project(name, owners=["olivia"], uploaders=[{"id": "lab"}], url=sim.url, token=ADMIN, **quota)


FILES = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(70_000), "sub/deep/c.csv": b"x,y\n1,2\n"}


def upload(sim: ThreadedSim, src: Path, project: str, version: str, token: str = OWNER, **kw: object) -> None:
    files = [str(p.relative_to(src)) for p in sorted(src.rglob("*")) if p.is_file()]
    init = gpc.start_upload(project, "asset", version, files=files, directory=str(src), url=sim.url, token=token, **kw)
    try:
        gpc.upload_files(init, directory=str(src), url=sim.url)
        gpc.complete_upload(init, url=sim.url)
    except Exception:
        gpc.abort_upload(init, url=sim.url)
        raise


def test_access_token_resolves_through_the_simulated_github(sim: ThreadedSim) -> None:
    info = gpc.set_access_token(UPLOADER, github_url=sim.url, app_url=sim.url, cache_dir=None)
    assert info["name"] == "ursula" and gpc.access_token(cache_dir=None) == UPLOADER
    with pytest.raises(Exception, match="401"):
        gpc.set_access_token("bogus", github_url=sim.url, app_url=sim.url, cache_dir=None)


def test_upload_then_every_read_function(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-read")
    src = make_tree(tmp_path / "src", FILES)
    upload(sim, src, "fid-read", "v1")
    url, cache = sim.url, str(tmp_path / "cache")
    assert gpc.fetch_latest("fid-read", "asset", url=url) == "v1"
    manifest = gpc.fetch_manifest("fid-read", "asset", "v1", cache_dir=cache, url=url)
    assert manifest == {k: {"size": len(v), "md5sum": hashlib.md5(v).hexdigest()} for k, v in FILES.items()}
    summary = gpc.fetch_summary("fid-read", "asset", "v1", cache_dir=cache, url=url)
    assert summary["upload_user_id"] == "olivia" and summary["upload_finish"] >= summary["upload_start"]
    assert gpc.list_projects(url=url).count("fid-read") == 1
    assert gpc.list_assets("fid-read", url=url) == ["asset"]
    assert gpc.list_versions("fid-read", "asset", url=url) == ["v1"]
    assert sorted(gpc.list_files("fid-read", "asset", "v1", url=url)) == sorted(["..manifest", "..summary", *FILES])
    assert gpc.list_files("fid-read", "asset", "v1", prefix="sub/", url=url) == ["sub/b.bin", "sub/deep/c.csv"]
    out = gpc.save_file("fid-read", "asset", "v1", "sub/b.bin", cache_dir=cache, url=url)
    assert Path(out).read_bytes() == FILES["sub/b.bin"]
    saved = gpc.save_version("fid-read", "asset", "v1", cache_dir=str(tmp_path / "cache2"), url=url)
    assert tree(Path(saved)) == FILES


def test_clone_links_and_dedup(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-links")
    url, cache = sim.url, str(tmp_path / "cache")
    upload(sim, make_tree(tmp_path / "src", FILES), "fid-links", "v1")
    # clone v1 as symlinks into the cache, change one file: upload_directory turns the rest into links
    dest = tmp_path / "clone"
    gpc.clone_version("fid-links", "asset", "v1", destination=str(dest), cache_dir=cache, url=url)
    os.unlink(dest / "a.txt")
    (dest / "a.txt").write_bytes(b"changed")
    assert gpc.upload_directory(str(dest), "fid-links", "asset", "v2", cache_dir=cache, url=url, token=OWNER)
    m2 = gpc.fetch_manifest("fid-links", "asset", "v2", cache_dir=None, url=url)
    assert "link" not in m2["a.txt"] and m2["sub/b.bin"]["link"]["version"] == "v1"
    assert not (bucket(sim) / "fid-links/asset/v2/sub/b.bin").exists()
    saved = gpc.save_version("fid-links", "asset", "v2", cache_dir=str(tmp_path / "c2"), url=url)
    assert tree(Path(saved)) == {**FILES, "a.txt": b"changed"}
    # gypsum-client's flag is inverted: dedup=False asks the server for type "dedup"
    files = [{"path": k, "size": len(v), "md5sum": hashlib.md5(v).hexdigest(), "dedup": False} for k, v in FILES.items()]
    init = gpc.start_upload("fid-links", "asset", "v3", files=files, url=url, token=OWNER)
    assert [f["path"] for f in init["file_urls"]] == ["a.txt"]  # a.txt differs from v2, the latest
    gpc.upload_files(init, directory=str(tmp_path / "src"), url=url)
    gpc.complete_upload(init, url=url)
    m3 = gpc.fetch_manifest("fid-links", "asset", "v3", cache_dir=None, url=url)
    assert m3["sub/b.bin"]["link"]["version"] == "v2" and m3["sub/b.bin"]["link"]["ancestor"]["version"] == "v1"
    saved = gpc.save_version("fid-links", "asset", "v3", cache_dir=str(tmp_path / "c3"), url=url)
    assert tree(Path(saved)) == FILES


def test_abort_and_lock(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-abort")
    src = make_tree(tmp_path / "src", FILES)
    init = gpc.start_upload("fid-abort", "asset", "v1", files=list(FILES), directory=str(src), url=sim.url, token=OWNER)
    with pytest.raises(Exception, match="already been locked"):
        gpc.start_upload("fid-abort", "asset", "v2", files=list(FILES), directory=str(src), url=sim.url, token=OWNER)
    gpc.abort_upload(init, url=sim.url)
    assert gpc.list_versions("fid-abort", "asset", url=sim.url) == []
    upload(sim, src, "fid-abort", "v1")
    with pytest.raises(Exception, match="already exists"):
        upload(sim, src, "fid-abort", "v1")
    assert gpc.list_versions("fid-abort", "asset", url=sim.url) == ["v1"]


def test_permissions_and_quota(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-perm", baseline=100_000, growth_rate=0)
    url = sim.url
    perms = gpc.fetch_permissions("fid-perm", url=url)
    assert perms == {"owners": ["olivia"], "uploaders": [{"id": "lab"}]}
    gpc.set_permissions("fid-perm", owners=["ursula"], uploaders=[{"id": "tim", "until": "2999-01-01T00:00:00Z"}],
                        url=url, token=OWNER)
    perms = gpc.fetch_permissions("fid-perm", url=url)
    assert sorted(perms["owners"]) == ["olivia", "ursula"] and perms["uploaders"][1]["until"].year == 2999
    with pytest.raises(Exception, match="403"):
        gpc.set_quota("fid-perm", baseline=1, url=url, token=OWNER)
    assert gpc.fetch_quota("fid-perm", url=url)["baseline"] == 100_000
    upload(sim, make_tree(tmp_path / "src", FILES), "fid-perm", "v1")
    used = sum(len(v) for v in FILES.values())
    assert gpc.fetch_usage("fid-perm", url=url) == used == gpc.refresh_usage("fid-perm", url=url, token=ADMIN)
    with pytest.raises(Exception, match="quota"):
        upload(sim, make_tree(tmp_path / "more", {"big": b"0" * 50_000}), "fid-perm", "v2")
    gpc.set_quota("fid-perm", baseline=1_000_000, url=url, token=ADMIN)
    upload(sim, tmp_path / "more", "fid-perm", "v2")
    assert gpc.fetch_usage("fid-perm", url=url) == used + 50_000


def test_probation_approve_reject(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-prob")
    url = sim.url
    src = make_tree(tmp_path / "src", FILES)
    upload(sim, src, "fid-prob", "v1")
    upload(sim, src, "fid-prob", "good", token=UPLOADER)  # untrusted: on probation
    assert gpc.fetch_summary("fid-prob", "asset", "good", cache_dir=None, url=url)["on_probation"] is True
    assert gpc.fetch_latest("fid-prob", "asset", url=url) == "v1"
    gpc.approve_probation("fid-prob", "asset", "good", url=url, token=OWNER)
    assert gpc.fetch_latest("fid-prob", "asset", url=url) == "good"
    upload(sim, src, "fid-prob", "bad", token=OWNER, probation=True)
    gpc.reject_probation("fid-prob", "asset", "bad", url=url, token=OWNER)
    assert sorted(gpc.list_versions("fid-prob", "asset", url=url)) == ["good", "v1"]
    with pytest.raises(Exception, match="400"):
        gpc.approve_probation("fid-prob", "asset", "v1", url=url, token=OWNER)


def test_refresh_and_remove(sim: ThreadedSim, tmp_path: Path) -> None:
    new_project(sim, "fid-rm")
    url = sim.url
    src = make_tree(tmp_path / "src", FILES)
    upload(sim, src, "fid-rm", "v1")
    upload(sim, src, "fid-rm", "v2")
    assert gpc.refresh_latest("fid-rm", "asset", url=url, token=ADMIN) == "v2"
    assert gpc.remove_version("fid-rm", "asset", "v2", url=url, token=ADMIN)
    assert gpc.fetch_latest("fid-rm", "asset", url=url) == "v1"
    assert gpc.remove_asset("fid-rm", "asset", url=url, token=ADMIN)
    assert gpc.list_assets("fid-rm", url=url) == []
    assert gpc.remove_project("fid-rm", url=url, token=ADMIN)
    assert "fid-rm" not in gpc.list_projects(url=url)


def test_gypsum_client_reads_what_asyncdepo_pushed(sim: ThreadedSim, tmp_path: Path) -> None:
    """Both directions: a version pushed by asyncdepo (with dedup links) is read back by gypsum-client."""
    import anyio

    from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
    from asyncdepo.config import EngineConfig
    from asyncdepo.engine.scheduler import push

    new_project(sim, "fid-ours")
    src = make_tree(tmp_path / "src", FILES)

    async def go(version: str) -> bool:
        adapter = GypsumAdapter(sim.url, "fid-ours", "asset", version, token=OWNER, sessions=tmp_path / "s")
        report = await push(src, adapter, EngineConfig(transfers=4), journal_path=tmp_path / "j.sqlite")
        return report.ok

    assert anyio.run(go, "v1")
    (src / "a.txt").write_bytes(b"second version")
    assert anyio.run(go, "v2")
    m2 = gpc.fetch_manifest("fid-ours", "asset", "v2", cache_dir=None, url=sim.url)
    assert m2["sub/b.bin"]["link"]["version"] == "v1" and "link" not in m2["a.txt"]
    saved = gpc.save_version("fid-ours", "asset", "v2", cache_dir=str(tmp_path / "cache"), url=sim.url)
    assert tree(Path(saved)) == {**FILES, "a.txt": b"second version"}
    assert gpc.fetch_latest("fid-ours", "asset", url=sim.url) == "v2"

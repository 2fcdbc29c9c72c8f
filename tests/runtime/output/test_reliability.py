"""Issue 10 in the output store: replacing a complete output only at the end, clear errors for locations
that refuse writes (read-only, permission denied, disk full), rows kept after failed writes."""

from __future__ import annotations

import builtins
import errno
import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.core.errors import OutputStateError  # noqa: E402
from hishrst_runtime.output import content as out_content  # noqa: E402
from hishrst_runtime.output import encoding as out_encoding  # noqa: E402
from hishrst_runtime.output.store import (  # noqa: E402
    OutputExistsError,
    OutputNotWritableError,
    OutputStore,
    partial_path,
    write_h5ad,
)
from tests.runtime.output.test_store import GENES, create, expected_values, write_all  # noqa: E402


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refuse_writes_in(monkeypatch: pytest.MonkeyPatch, directory: Path, code: int = errno.EACCES) -> list[str]:
    """Make ``directory`` refuse changes to its entries, as the OS does (also for root, which ignores
    permission bits): ``EACCES`` acts as a ``chmod a-w`` folder (no entry of it can be created, removed or
    renamed; its existing files and sub-folders stay writable), ``EROFS`` as a read-only filesystem
    mounted there (nothing below it can be created, removed, renamed or opened for writing).

    Patches the calls every write goes through (``os.open`` / ``os.mkdir`` / ``os.rename`` / ``os.replace``
    / ``os.unlink`` / ``os.rmdir`` / ``os.link`` / ``os.symlink`` and ``open``, hence ``pathlib``,
    ``tempfile``, ``shutil``) to raise ``OSError(code)`` naming the path. Returns the refused paths.
    """
    top = os.path.realpath(directory)
    refused: list[str] = []
    real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink", "remove",
                                                  "rmdir", "link", "symlink")}
    real_open = builtins.open

    def where(path: Any, dir_fd: int | None = None) -> tuple[str, bool]:
        """(the absolute entry path, whether its folder is the refusing one)."""
        p = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        p = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p))
        parent = os.path.dirname(p)
        hit = parent == top or (code == errno.EROFS and parent.startswith(top + os.sep))
        return p, hit

    def refuse(p: str) -> None:
        refused.append(p)
        raise OSError(code, os.strerror(code), p)  # PermissionError for EACCES

    def check_new(path: Any, dir_fd: int | None = None, *, writes_existing: bool = False) -> None:
        p, hit = where(path, dir_fd)
        if hit and (not os.path.lexists(p) or (writes_existing and code == errno.EROFS)):
            refuse(p)

    def check_entry(path: Any, dir_fd: int | None = None) -> None:
        p, hit = where(path, dir_fd)
        if hit and os.path.lexists(p):
            refuse(p)

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if flags & os.O_CREAT or writes:
            p, hit = where(path, dir_fd)
            if hit and ((flags & os.O_CREAT and not os.path.lexists(p)) or (writes and code == errno.EROFS)):
                refuse(p)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def open_(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            check_new(file, writes_existing=True)
        return real_open(file, mode, *a, **kw)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        check_new(path, dir_fd)
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def move(name: str) -> Any:
        def wrapped(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
            if where(src, src_dir_fd)[1] or where(dst, dst_dir_fd)[1]:
                refuse(where(src, src_dir_fd)[0])
            return real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return wrapped

    def remove(name: str) -> Any:
        def wrapped(path: Any, *, dir_fd: int | None = None) -> None:
            check_entry(path, dir_fd)
            return real[name](path, dir_fd=dir_fd)
        return wrapped

    def link(name: str) -> Any:
        def wrapped(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            check_new(dst, kw.get("dst_dir_fd") or kw.get("dir_fd"))
            return real[name](src, dst, *a, **kw)
        return wrapped

    for name, fn in [("open", os_open), ("mkdir", mkdir), ("rename", move("rename")), ("replace", move("replace")),
                     ("unlink", remove("unlink")), ("remove", remove("remove")), ("rmdir", remove("rmdir")),
                     ("link", link("link")), ("symlink", link("symlink"))]:
        monkeypatch.setattr(os, name, fn)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's Path.open / read_* / write_*
    return refused


def complete_store(path: Path, n: int = 40) -> dict[str, bytes]:
    store = create(path, n=n)
    write_all(store, np.arange(n))
    store.finalize({"run": 1})
    return snapshot(path)


def failing_once(monkeypatch: pytest.MonkeyPatch, code: int, *, torn: bool = False) -> list[int]:
    """Make the next X chunk write fail with ``code`` (after writing garbage if ``torn``); later ones succeed."""
    real = out_encoding.XChunks.write
    calls: list[int] = []

    def flaky(self, k, data, *, fsync):
        calls.append(k)
        if len(calls) == 1:
            if torn:
                self.path(k).write_bytes(b"\x00garbage")
            raise OSError(code, os.strerror(code), str(self.path(k)))
        return real(self, k, data, fsync=fsync)

    monkeypatch.setattr(out_encoding.XChunks, "write", flaky)
    return calls


def assert_one_line(e: BaseException, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    assert isinstance(e, OutputStateError) and isinstance(e, OSError)
    assert isinstance(e.__cause__, OSError)


def test_replace_keeps_complete_output_until_finalize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    before = complete_store(path)
    # a run that fails before finalize (here: disk full on its last flush) leaves the old output as it was
    store = create(path, n=20, replace=True)
    assert OutputStore.status(path) == "complete"
    failing_once(monkeypatch, errno.ENOSPC)
    with pytest.raises(OutputNotWritableError, match="no space left"):  # on a full chunk's write or on finalize
        write_all(store, np.arange(20))
        store.finalize()
    store.close()
    assert snapshot(path) == before and OutputStore.status(path) == "complete"
    # a new replacing run discards that partial; the swap happens only in finalize
    store = create(path, n=20, replace=True)
    write_all(store, np.arange(20))
    assert snapshot(path) == before
    store.finalize()
    assert ad.read_zarr(path).n_obs == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no partial, old copy or trash left


def test_replace_failed_publish_restores_old_then_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    before = complete_store(path)
    store = create(path, n=20, replace=True)
    write_all(store, np.arange(20))
    real_rename = os.rename

    def rename(src, dst):  # the old output is moved aside, then moving the new one in fails
        if Path(src) == partial_path(path):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputNotWritableError, match="simulated"):
        store.finalize()
    monkeypatch.undo()
    assert snapshot(path) == before  # put back
    with pytest.raises(OutputExistsError, match="already complete"):
        OutputStore.open_incomplete(path)
    store = OutputStore.open_incomplete(path, genes=GENES, replace=True)
    assert store.done_mask().all()
    store.finalize()
    assert ad.read_zarr(path).n_obs == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_replace_and_create_never_touch_a_foreign_store(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    (path / "0").mkdir(parents=True)
    (path / ".zgroup").write_text('{"zarr_format": 2}')
    (path / "0" / ".zarray").write_text("{}")
    before = snapshot(path)
    for kw in ({"replace": True}, {}):
        with pytest.raises(OutputExistsError, match="move it away") as info:
            create(path, n=20, **kw)
        assert str(path) in str(info.value) and "--overwrite" not in str(info.value)
    with pytest.raises(OutputExistsError, match="move it away"):
        OutputStore.open_incomplete(path)
    assert snapshot(path) == before and not partial_path(path).exists()


def test_debris_of_a_killed_swap_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    for name in (".s.zarr.old-1-ab", ".s.zarr.trash-2-cd", ".s.zarr.partial.tmp-3-ef"):
        (tmp_path / name / "X").mkdir(parents=True)
    (tmp_path / ".other.zarr.old-1-ab").mkdir()
    create(path, n=10).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zarr.old-1-ab", "s.zarr.partial"]


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                         (errno.ENOSPC, "no space left")])
def test_create_in_a_location_that_refuses_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  code: int, words: str) -> None:
    path = tmp_path / "out" / "s.zarr"

    def refuse(p, attrs):
        raise OSError(code, os.strerror(code), str(p))

    monkeypatch.setattr(out_content.encoding, "write_group", refuse)
    with pytest.raises(OutputNotWritableError, match=words) as info:
        create(path, n=10)
    assert_one_line(info.value, path)
    assert info.value.errno == code
    assert [p.name for p in path.parent.iterdir()] == []  # no partial, no temporary skeleton


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_create_in_a_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         code: int, words: str) -> None:
    """A folder that refuses new entries (``chmod a-w``, or a read-only mount): one line naming the output,
    nothing left behind. Simulated at the OS calls so that it also holds when the tests run as root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "other.zarr").mkdir()  # someone's earlier output next to it stays as it is
    before = snapshot(ro), sorted(p.name for p in ro.iterdir())
    refused = refuse_writes_in(monkeypatch, ro, code)
    with pytest.raises(OutputNotWritableError, match=words) as info:
        create(ro / "s.zarr", n=10)
    assert refused, "the store never tried to write into the folder"
    assert_one_line(info.value, ro / "s.zarr")
    assert info.value.errno == code and info.value.__cause__.errno == code
    assert "Traceback" not in str(info.value)
    monkeypatch.undo()
    assert (snapshot(ro), sorted(p.name for p in ro.iterdir())) == before  # no partial, no temporary skeleton
    assert OutputStore.status(ro / "s.zarr") == "missing"
    create(ro / "s.zarr", n=10).close()  # writable again: the failed attempt left nothing in the way
    assert OutputStore.status(ro / "s.zarr") == "incomplete"


def test_disk_full_while_writing_keeps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=64, flush_interval_s=1e9)
    store.write_rows(np.arange(10), expected_values(np.arange(10)))
    store.flush()  # rows 0-9 are claimed on disk
    store.write_rows(np.arange(10, 20), expected_values(np.arange(10, 20)))
    failing_once(monkeypatch, errno.ENOSPC, torn=True)  # the rewrite of chunk 0 is torn, then fails
    with pytest.raises(OutputNotWritableError, match="--resume") as info:
        store.flush()
    assert_one_line(info.value, partial_path(path))
    assert not store.done_mask()[:32].any()  # the torn chunk claims nothing
    store.flush()  # space freed: the retry writes every row of chunk 0 again
    assert store.done_mask()[:20].all()
    write_all(store, np.arange(20, 64))
    store.finalize()
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(64)))


def test_failed_eviction_keeps_the_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    one_chunk = 32 * len(GENES) * 4
    store = create(path, n=128, flush_interval_s=1e9, max_buffer_bytes=one_chunk)
    store.write_rows(np.arange(0, 5), expected_values(np.arange(0, 5)))  # chunk 0, partial
    calls = failing_once(monkeypatch, errno.ENOSPC)
    with pytest.raises(OutputNotWritableError, match="no space left"):
        store.write_rows(np.arange(40, 45), expected_values(np.arange(40, 45)))  # evicting chunk 0 fails
    assert calls == [0]
    write_all(store, np.setdiff1d(np.arange(128), np.r_[0:5, 40:45]))  # evictions succeed now
    store.finalize()  # every row is there: the failed eviction dropped nothing
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(128)))


def test_finalize_disk_full_then_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=40)
    write_all(store, np.arange(40))
    real = out_encoding.write_uns

    def full(uns_dir, key, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(uns_dir / key))

    monkeypatch.setattr(out_encoding, "write_uns", full)
    with pytest.raises(OutputNotWritableError, match="no space left") as info:
        store.finalize({"timings": {"total_s": 1.0}})
    assert_one_line(info.value, partial_path(path))
    assert OutputStore.status(path) == "incomplete" and store.done_mask().all()
    monkeypatch.setattr(out_encoding, "write_uns", real)
    store.finalize({"timings": {"total_s": 1.0}})
    assert ad.read_zarr(path).uns["timings"]["total_s"] == 1.0


def test_resume_in_a_location_that_refuses_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    create(path, n=40).close()
    (partial_path(path) / ".hishrst_progress").rmdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if self.name == ".hishrst_progress":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OutputNotWritableError, match="permission denied") as info:
        OutputStore.open_incomplete(path)
    assert_one_line(info.value, partial_path(path))


def test_h5ad_copy_disk_full_keeps_earlier_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    complete_store(path)
    h5 = write_h5ad(path, tmp_path / "s.h5ad")
    before = h5.read_bytes()

    def full(self, filename, *a, **kw):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    with pytest.raises(OutputNotWritableError, match="no space left") as info:
        write_h5ad(path, h5)
    assert_one_line(info.value, h5)
    assert h5.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.h5ad", "s.zarr"]


def test_repr_reads_the_done_mask_under_its_lock(tmp_path: Path) -> None:
    store = create(tmp_path / "s.zarr", n=40)
    out: list[str] = []
    lock = store._rows._done_lock  # held as the writer thread holds it while claiming rows
    with lock:
        t = threading.Thread(target=lambda: out.append(repr(store)))
        t.start()
        t.join(0.2)
        assert not out  # waits for the lock
    t.join(10)
    assert out and "done=0" in out[0] and "n_obs=40" in out[0]
    store.close()

"""Which slides a run takes: the checks before a slide is predicted (a mixin of the runner's slide loop).

A slide is not run when its output collides with another slide's, is complete (what it lacks, its other
``--format`` outputs, is finished under its lock), is locked by another live job, its lock file cannot be
created, or a file hishrst did not write sits at one of its outputs. Otherwise its lock is taken (without
waiting) before it is prepared for its turn; the lock is held until the slide is finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.jobs.formats import (finish_formats, foreign_format_output, foreign_tissue_geojson,
                                          formats_pending, is_done)
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.locks import SlideLock
from hishrst_runtime.jobs.options import RunOptions
from hishrst_runtime.jobs.paths import foreign_output, slide_problem
from hishrst_runtime.jobs.results import SlideResult
from hishrst_runtime.output.names import SlideOutputs

__all__ = ["Admission"]


class Admission:
    """The refusals of :class:`hishrst_runtime.jobs.runner._Runner` (which sets these attributes)."""

    items: list[SlideInput]
    slides: list[Any]
    outputs: list[SlideOutputs]
    outs: list[Path]
    collided: set[Path]
    locked: set[int]
    opts: RunOptions

    def _drop(self, i: int) -> None:  # the runner forgets slide i's prefetch
        raise NotImplementedError

    def _take(self, i: int, res: SlideResult, lock: SlideLock) -> SlideResult | None:
        """Take slide i's lock without waiting: None when held now, else the slide's result (skipped:
        locked by another job; failed: the lock file cannot be created)."""
        try:
            lock.path.parent.mkdir(parents=True, exist_ok=True)  # OUT/p1/ of a slide found in sub-folder p1
            held = lock.acquire()
        except (OutputStateError, OSError) as e:  # no lock file: this slide fails, the others go on
            self._drop(i)
            return res.with_(status="failed", reason=f"{type(e).__name__}: {e}")
        if held:
            return None
        self._drop(i)
        self.locked.add(i)
        info = lock.holder()
        who = info.describe() if info is not None else "another job"
        return res.with_(status="skipped", reason=f"locked by {who} ({lock.path}); it is being processed "
                         "elsewhere (delete the lock file if that job is gone)")

    def _skip_complete(self, i: int, res: SlideResult, lock: SlideLock, *, held: bool = False) -> SlideResult:
        """Skip the complete slide i, finishing what it lacks (its other ``--format`` outputs) under its lock,
        taken without waiting unless ``held``; a slide locked by another job is left to it untouched."""
        self._drop(i)
        res = res.with_(status="skipped", reason="already complete (use --overwrite to recompute)")
        outs, formats = self.outputs[i], self.opts.formats
        if not formats_pending(outs, formats):
            if held:
                lock.release()
            return res
        if not held:
            refused = self._take(i, res, lock)
            if refused is not None:
                return refused
        try:  # a run killed between the AnnData store and its other outputs
            notes = finish_formats(outs, formats)
            res = res.with_(reason="; ".join([res.reason, *notes]))
        except (OSError, ValueError, RuntimeError) as e:
            res = res.with_(reason=f"{res.reason}; finishing its outputs failed ({type(e).__name__}: {e})")
        finally:
            lock.release()
        return res

    def _foreign(self, i: int) -> str | None:
        """Why an existing file at one of slide i's outputs must be left alone (hishrst did not write it)."""
        outs, mask, geojson = self.outputs[i], self.items[i].mask, self.opts.tissue_geojson
        return (foreign_output(outs.store) or foreign_format_output(outs, self.opts.formats)
                or (foreign_tissue_geojson(outs, mask) if geojson or (geojson is None and mask is not None) else None))

    def _refused(self, i: int, res: SlideResult, lock: SlideLock) -> SlideResult | None:
        """The result of a slide that is not run (collision, complete, locked, lock impossible, a foreign file
        at an output), else None; when None is returned ``lock`` is held."""
        out = self.outs[i]
        assert out is not None
        problem = slide_problem(self.slides[i], out)
        if problem is not None:
            self._drop(i)
            return res.with_(status="failed", reason=problem)
        foreign = self._foreign(i)
        if foreign is not None:
            self._drop(i)
            return res.with_(status="failed", reason=foreign)
        if out in self.collided:
            others = ", ".join(str(s) for s, o in zip(self.slides, self.outs) if o == out)
            return res.with_(status="failed", reason=f"{out}: several slides would write this output ({others}); "
                             "rename the slides or run them with different --out")
        if not self.opts.overwrite and is_done(out, self.opts.formats):
            return self._skip_complete(i, res, lock)
        refused = self._take(i, res, lock)
        if refused is not None:
            return refused
        if not self.opts.overwrite and is_done(out, self.opts.formats):  # finished by another job meanwhile
            return self._skip_complete(i, res, lock, held=True)
        return None

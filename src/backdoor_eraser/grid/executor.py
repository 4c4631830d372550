"""Executors: run a spec's cells from the store until none is left.

``local`` with one worker runs cells in this process; with ``workers=N`` it starts N worker processes
that each claim cells from the store. ``ray`` sends each cell to a Ray cluster as a task (the store is
written by this process only; the cells' run folders must live on a file system the cluster shares).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError
from .report import seconds
from .runner import DataCache, RunOptions, code_version, host_info, one_line, timed_run
from .store import Store, worker_id


class Progress:
    """One line per finished cell with done/total and an ETA from the measured cell times."""

    def __init__(self, store: Store, spec: str, workers: int = 1, say=None, scope: set[str] | None = None):
        self.store, self.spec, self.workers, self.scope = store, spec, max(1, workers), scope
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def line(self, row: dict, metrics: dict | None, wall: float, error: str | None = None) -> str:
        counts = self.store.counts(self.spec, self.scope)
        total = sum(counts.values())
        finished = counts["done"] + counts["failed"]
        what = self.what(row)
        if error:
            result = f"FAILED: {error}"
        else:
            result = "  ".join(f"{k.upper()} {100 * metrics[k]:.2f}" for k in ("acc", "asr") if
                               isinstance(metrics.get(k), (int, float)))
        eta = self.eta()
        return (f"[{finished}/{total}] {row['kind']} {what}: {result} ({wall:.0f} s"
                + (f"; ETA {seconds(eta)}" if eta else "") + ")")

    @staticmethod
    def what(row: dict) -> str:
        axes = row.get("axes") or {}
        what = " · ".join(str(axes[k]) for k in ("attack", "defense") if axes.get(k)) or row["hash"][:8]
        if axes.get("seed") is not None:
            what += f" · seed {axes['seed']}"
        return what

    def eta(self) -> float | None:
        rows = self.store.rows(self.spec)
        mean = {}
        for kind in ("attack", "defense"):
            times = [r["wall_seconds"] for r in rows if r["kind"] == kind and r["status"] == "done"
                     and r["wall_seconds"] is not None]
            if times:
                mean[kind] = sum(times) / len(times)
        left = [r for r in rows if r["status"] in ("pending", "running")
                and (self.scope is None or r["hash"] in self.scope)]
        if not left:
            return None
        fallback = sum(mean.values()) / len(mean) if mean else None
        if fallback is None:
            return None
        return sum(mean.get(r["kind"], fallback) for r in left) / self.workers


class Heartbeat:
    """Beats for the cells a worker runs (its own store connection: sqlite connections stay in their thread)."""

    def __init__(self, folder: Path, worker: str, every: float = 15.0):
        self.folder, self.worker, self.every = folder, worker, every
        self.hashes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        store = Store(self.folder, create=False)
        try:
            while not self._stop.wait(self.every):
                for h in list(self.hashes):
                    store.beat(h, self.worker)
        finally:
            store.close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


def model_dirs_for(store: Store, row: dict) -> dict[str, str]:
    if not row["deps"]:
        return {}
    marks = ",".join("?" * len(row["deps"]))
    return {r[0]: r[1] for r in store.db.execute(f"SELECT hash, run_dir FROM cells WHERE hash IN ({marks})",
                                                 row["deps"])}


def _axes_of(store: Store, spec: str, row: dict) -> dict:
    r = store.db.execute("SELECT axes FROM members WHERE spec = ? AND hash = ?", (spec, row["hash"])).fetchone()
    return json.loads(r[0]) if r else {}


def work(folder: Path, spec: str, opts: RunOptions, *, progress: Progress | None = None, wait_for_others: bool = True,
         scope: set[str] | None = None):
    """Claim and run cells of ``spec`` (those in ``scope``: the cells an ``--only`` selected) until none is
    left, waiting while other workers hold the rest."""
    store = Store(folder, create=False)
    me = worker_id()
    beat = Heartbeat(folder, me)
    progress = progress or Progress(store, spec, scope=scope)
    cache = DataCache()
    if opts.threads:
        import torch
        torch.set_num_threads(opts.threads)
    try:
        while True:
            row = store.claim(spec, me, scope)
            if row is None:
                counts = store.counts(spec, scope)
                if wait_for_others and counts["running"]:
                    time.sleep(2.0)
                    continue
                return
            row["axes"] = _axes_of(store, spec, row)
            if any(Path(row["run_dir"]).glob("**/checkpoint.pt")):
                progress.say(f"{row['kind']} {progress.what(row)}: resuming from its checkpoint")
            beat.hashes.add(row["hash"])
            t0 = time.perf_counter()
            try:
                metrics, steps, wall = timed_run(row, model_dirs_for(store, row), opts, cache)
            except KeyboardInterrupt:
                store.release(row["hash"], me)
                raise
            except Exception as exc:  # noqa: BLE001  (a failed cell is recorded and the grid goes on)
                err, wall = one_line(exc), time.perf_counter() - t0
                store.fail(row["hash"], err, host=host_info(opts.device), worker=me, wall_seconds=wall)
                progress.say(progress.line(row, None, wall, err))
                continue
            finally:
                beat.hashes.discard(row["hash"])
            if store.finish(row["hash"], metrics, wall_seconds=wall, steps=steps, host=host_info(opts.device),
                            code_version=code_version(), worker=me):
                progress.say(progress.line(row, metrics, wall))
    finally:
        beat.stop()
        store.close()


def run_local(folder: Path, spec: str, opts: RunOptions, *, workers: int = 1, say=None, scope: set[str] | None = None):
    if workers <= 1:
        store = Store(folder, create=False)
        try:
            work(folder, spec, opts, progress=Progress(store, spec, 1, say, scope), scope=scope)
        finally:
            store.close()
        return
    threads = opts.threads or max(1, (os.cpu_count() or 1) // workers)
    payload = json.dumps({"folder": str(folder), "spec": spec, "workers": workers,
                          "scope": sorted(scope) if scope is not None else None,
                          "opts": {**dataclasses.asdict(opts), "threads": threads, "quiet": True}})
    procs = [subprocess.Popen([sys.executable, "-m", "backdoor_eraser.grid.executor", payload]) for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    if any(codes):
        raise UserError(f"{sum(1 for c in codes if c)} of {workers} grid workers exited with an error "
                        f"(exit codes {codes}); rerun the same command to continue")


def _worker_main(payload: str) -> int:
    args = json.loads(payload)
    opts = RunOptions(**args["opts"])
    # SIGTERM (a scheduler stopping us) gives the cell back like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    store = Store(args["folder"], create=False)
    scope = set(args["scope"]) if args.get("scope") is not None else None
    try:
        work(Path(args["folder"]), args["spec"], opts, progress=Progress(store, args["spec"], args["workers"], scope=scope),
             scope=scope)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


# ---- Ray ---------------------------------------------------------------------------------------------

_RAY_CACHE: DataCache | None = None


def _ray_cell(row: dict, model_dirs: dict, opts_dict: dict):
    global _RAY_CACHE
    _RAY_CACHE = _RAY_CACHE or DataCache()
    opts = RunOptions(**opts_dict)
    try:
        metrics, steps, wall = timed_run(row, model_dirs, opts, _RAY_CACHE)
        return {"metrics": metrics, "steps": steps, "wall": wall, "host": host_info(opts.device),
                "code_version": code_version()}
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc), "host": host_info(opts.device)}


def run_ray(folder: Path, spec: str, opts: RunOptions, *, address: str | None = None, cpus_per_cell: float = 1.0,
            gpus_per_cell: float = 0.0, say=None, scope: set[str] | None = None):
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'backdoor-eraser[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
             **({} if address else {"include_dashboard": False}))
    remote = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell)(_ray_cell)
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_cell, 1e-9)))
    if gpus_per_cell:
        capacity = min(capacity, max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_cell)))
    store = Store(folder, create=False)
    me = worker_id()
    progress = Progress(store, spec, capacity, say, scope)
    opts_dict = {**dataclasses.asdict(opts), "quiet": True}
    in_flight: dict = {}
    try:
        while True:
            while len(in_flight) < capacity:
                row = store.claim(spec, me, scope)
                if row is None:
                    break
                row["axes"] = _axes_of(store, spec, row)
                in_flight[remote.remote(row, model_dirs_for(store, row), opts_dict)] = row
            if not in_flight:
                if store.counts(spec, scope)["running"]:
                    time.sleep(2.0)
                    continue
                return
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=15.0)
            for row in in_flight.values():
                store.beat(row["hash"], me)
            for ref in done:
                row = in_flight.pop(ref)
                out = ray.get(ref)
                if "error" in out:
                    store.fail(row["hash"], out["error"], host=out["host"], worker=me)
                    progress.say(progress.line(row, None, 0.0, out["error"]))
                else:
                    store.finish(row["hash"], out["metrics"], wall_seconds=out["wall"], steps=out["steps"],
                                 host=out["host"], code_version=out["code_version"], worker=me)
                    progress.say(progress.line(row, out["metrics"], out["wall"]))
    except KeyboardInterrupt:
        for ref, row in in_flight.items():
            ray.cancel(ref, force=True)
            store.release(row["hash"], me)
        raise
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))

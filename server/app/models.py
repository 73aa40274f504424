"""Loading the models the server serves, and keeping a repository's versions in step (docs/models.md).

With `--model FILE` one model is loaded at start-up as version 1. With `--model-repository DIR` every model
folder is read (server/model/repository.py) and the versions its policy selects are loaded, warmed up and
only then handed to the data plane, so no request waits for a load. Afterwards the folder is read again every
`--repository-poll-s` (and on RepositoryModelLoad): a version whose files have not changed since the last
read is loaded; one that fails to load is logged with the reason and tried again only once its files change,
while the versions already serving keep serving. A version that leaves the policy (a newer one arrived, its
folder was removed, or it was unloaded on request) is retired: it drains (serves the sequences pinned to it,
no new one) and is dropped `--version-drain-s` after its last chunk (after its unload, when unloaded on
request). Loads run on their own thread, so the event loop keeps serving meanwhile.

Replicas share the repository and a registry in Redis of which version wrote which fingerprint
(server/state/registry.py). A replica that meets a stream pinned to a version it has not loaded (it started
after a newer one arrived) loads that version from the repository for it, answering the stream's chunks
UNAVAILABLE (retryable, not applied) meanwhile; a version no longer in the repository gets the retired policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server import metrics
from server.config import ServerConfig
from server.dataplane.plane import DataPlane, ServedModel
from server.dataplane.versions import DRAINING, LOADING, UNAVAILABLE, ModelVersions, ServingVersion, VersionStatus
from server.errors import StartupError, model_load_failed, model_not_found, model_version_unavailable
from server.model.repository import MODEL_FILES, ModelFolder, VersionFiles, VersionPolicy, scan
from server.model.runner import ModelLoadError, ModelRunner
from server.state.formats import REDIS_ERRORS
from server.state.registry import VersionRegistry
from server.types import Runner

log = logging.getLogger("server")

# The drain clock and the pinned versions are looked at this often, whatever --repository-poll-s says.
_TICK_S = 1.0
# A fingerprint the registry does not know (another model's) is asked about again after this long.
_UNKNOWN_FINGERPRINT_S = 10.0
# A version loading for its pinned sequences: no need to ask the registry again meanwhile.
_LOADING_S = 3600.0


def load_runner(config: ServerConfig, path: str | Path) -> Runner:
    """A model file, checked, warm (its calls for the configured chunk lengths compiled) and described in the log."""
    runner: Runner = ModelRunner(
        path, config.max_chunk_timesteps, xla=config.xla, max_batch=config.max_batch,
        numpy_max_batch_timesteps=config.numpy_max_batch_timesteps,
    )
    if config.identity_model:
        from server.model.identity import IdentityRunner

        runner = IdentityRunner(runner.description, config.max_chunk_timesteps)
    runner.warm_up(config.warmup_lengths())
    return runner


def describe_in_log(runner: Runner, path: str | Path, model: str, version: int, seconds: float) -> None:
    description = runner.description
    log.info(
        "model loaded",
        extra={"fields": {"model": model, "version": version, "path": str(path), "name": description.name,
                          "fingerprint": description.fingerprint, "input_features": description.input_features,
                          "output_size": description.output_size, "state_size": description.state_size,
                          "per_timestep_outputs": description.per_timestep_outputs, "seconds": round(seconds, 2)}},
    )


class RepositoryModels:
    """The models of `--model-repository`: loads, polls, retires and drops their versions (a ModelControl)."""

    def __init__(self, config: ServerConfig, registry: VersionRegistry,
                 load: Callable[[ServerConfig, Path], Runner] = load_runner) -> None:
        self.config = config
        self._registry = registry
        self._background: set[asyncio.Task[None]] = set()
        self.root = Path(config.model_repository)
        self.policy = VersionPolicy.parse(config.version_policy)
        # Why a model's shapes do not fit the server's message limits (None: they fit); set once they are known.
        self._fits: Callable[[int, int], str | None] = lambda features, outputs: None
        self._load = load
        self._dataplane: DataPlane | None = None
        # What each version's files looked like at the last read: a version is loaded once they stop changing.
        self._last_seen: dict[tuple[str, int], tuple[tuple[str, int, int], ...]] = {}
        # Versions that failed to load, with the files they failed with: tried again when those change.
        self._failed: dict[tuple[str, int], tuple[tuple[tuple[str, int, int], ...], str]] = {}
        # Unloaded on request: not loaded again by polling until RepositoryModelLoad names their model.
        self._unloaded: set[tuple[str, int]] = set()
        self._problems_logged: set[str] = set()
        # Versions being loaded for the sequences pinned to them (`locate`).
        self._pinned_loads: set[tuple[str, int]] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # Start-up: everything the policies select, before the port opens.

    async def load_initial(self, dataplane: DataPlane) -> None:
        if not self.root.is_dir():
            raise StartupError(f"--model-repository {self.root}: no such folder")
        self._dataplane = dataplane
        for folder in scan(self.root).values():
            self._log_problems(folder)
            for files in folder.versions.values():
                self._last_seen[(folder.name, files.version)] = files.signature
            await self._load_wanted(folder, settled_only=False)
        if not dataplane.model_names():
            reasons = "; ".join(f"{m} version {v}: {why}" for (m, v), (_, why) in sorted(self._failed.items()))
            raise StartupError(f"--model-repository {self.root}: no model version could be loaded"
                               + (f" ({reasons})" if reasons else " (expected DIR/<model>/<version>/model.keras)"))

    def set_fits(self, fits: Callable[[int, int], str | None]) -> None:
        self._fits = fits

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="model-repository")

    async def stop(self) -> None:
        for task in [self._task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._thread.shutdown(wait=False, cancel_futures=True)

    # ModelControl: what the repository RPCs call.

    async def load(self, model: str) -> None:
        async with self._lock:
            folders = scan(self.root)
            if model not in folders:
                raise model_not_found(model, sorted(folders))
            self._unloaded = {key for key in self._unloaded if key[0] != model}
            await self._refresh(folders, only=model, settled_only=False)
            failures = [f"version {v}: {why}" for (m, v), (_, why) in sorted(self._failed.items()) if m == model]
            assert self._dataplane is not None
            served = self._served(model)
            if served is None or not served.versions.newest():
                raise model_load_failed(model, failures or ["no version folder with a model file"])

    async def unload(self, model: str, version: int = 0) -> None:
        assert self._dataplane is not None
        async with self._lock:
            served = self._dataplane.served(model)
            numbers = [v.number for v in served.versions.serving()] if not version else [version]
            if version and served.versions.get(version) is None:
                raise model_version_unavailable(model, version, served.versions.ready_numbers())
            for number in numbers:
                self._unloaded.add((model, number))
                served.versions.retire(number, "unloaded on request", unload_requested=True)
                log.info("model version retired", extra={"fields": {"model": model, "version": number,
                                                                     "reason": "unloaded on request"}})

    async def locate(self, versions: ModelVersions, fingerprints: set[bytes], deadline: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                found = await self._registry.lookup(versions.name, fingerprints)
        except REDIS_ERRORS:
            for fingerprint in fingerprints:
                versions.note_unresolved(fingerprint)  # their chunks: UNAVAILABLE, asked again on the next
            return
        for fingerprint in fingerprints:
            number = found.get(fingerprint, 0)
            if not number:
                versions.note_located(fingerprint, 0, _UNKNOWN_FINGERPRINT_S)  # another model's slot
                continue
            folder = self.root / versions.name / str(number)
            available = any((folder / name).is_file() for name in MODEL_FILES)
            if not available or (versions.name, number) in self._unloaded:
                versions.note_gone(fingerprint, number)  # retired: its sequences get --on-retired-version
                continue
            versions.note_located(fingerprint, number, _LOADING_S)
            if versions.get(number) is None and (versions.name, number) not in self._pinned_loads:
                self._pinned_loads.add((versions.name, number))
                versions.mark(number, LOADING)
                self._spawn(self._load_pinned(versions, number, fingerprint))

    async def _load_pinned(self, versions: ModelVersions, number: int, fingerprint: bytes) -> None:
        """Load a version for the sequences pinned to it: it serves them (DRAINING), never a new one."""
        try:
            async with self._lock:
                folders = scan(self.root)
                files = folders.get(versions.name, ModelFolder(versions.name)).versions.get(number)
                if files is None:
                    versions.forget(number)
                    versions.note_gone(fingerprint, number)
                    return
                runner = await asyncio.get_running_loop().run_in_executor(self._thread, self._try_load, files)
                self._add(files, runner)
                if versions.get(number) is None:
                    versions.note_gone(fingerprint, number)  # it failed to load: the retired policy applies
                elif number not in self._wanted(folders[versions.name], settled_only=False):
                    versions.retire(number, "loaded for the sequences pinned to it")
        finally:
            self._pinned_loads.discard((versions.name, number))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("model repository task failed", exc_info=error)

    async def _register(self, model: str, fingerprint: bytes, number: int) -> None:
        try:
            await self._registry.record(model, fingerprint, number)
        except REDIS_ERRORS as exc:
            # Only replicas that never loaded this version need it, to find it for its pinned sequences.
            log.warning("could not record the version's fingerprint in Redis",
                        extra={"fields": {"model": model, "version": number, "error": str(exc)}})

    def status(self) -> list[VersionStatus]:
        """Versions of models with nothing loaded yet (their failures): the data plane lists the others."""
        assert self._dataplane is not None
        served = set(self._dataplane.model_names())
        return [VersionStatus(m, v, UNAVAILABLE, why) for (m, v), (_, why) in sorted(self._failed.items())
                if m not in served]

    # The watch: read the folder every --repository-poll-s, drop drained versions every tick.

    async def _watch(self) -> None:
        next_scan = time.monotonic() + self.config.repository_poll_s
        while True:
            await asyncio.sleep(_TICK_S if self.config.repository_poll_s <= 0 else
                                min(_TICK_S, self.config.repository_poll_s))
            try:
                if self.config.repository_poll_s > 0 and time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.config.repository_poll_s
                    async with self._lock:
                        await self._refresh(scan(self.root))
                self._drop_drained()
            except asyncio.CancelledError:
                raise
            except Exception:  # a folder that vanished or cannot be read: log it, keep serving, read it again
                log.exception("reading the model repository failed", extra={"fields": {"path": str(self.root)}})

    async def _refresh(self, folders: dict[str, ModelFolder], *, only: str = "", settled_only: bool = True) -> None:
        assert self._dataplane is not None
        for name in sorted(set(folders) | set(self._dataplane.model_names())):
            if only and name != only:
                continue
            folder = folders.get(name, ModelFolder(name))
            self._log_problems(folder)
            wanted = await self._load_wanted(folder, settled_only)
            for files in folder.versions.values():
                self._last_seen[(name, files.version)] = files.signature
            served = self._served(name)
            if served is None:
                continue
            for version in served.versions.serving():
                if version.number in wanted or version.state == DRAINING:
                    continue
                reason = ("its folder was removed" if version.number not in folder.versions
                          else f"out of the version policy ({folder.policy or self.policy})")
                served.versions.retire(version.number, reason)
                log.info("model version retired", extra={"fields": {"model": name, "version": version.number,
                                                                     "reason": reason}})

    async def _load_wanted(self, folder: ModelFolder, settled_only: bool) -> set[int]:
        """Load the versions the policy selects; one that fails is left out and the policy asked again (so a
        broken newest version leaves the one before it serving). Returns the versions that serve the policy."""
        name = folder.name
        while True:
            wanted = self._wanted(folder, settled_only=settled_only)
            served = self._served(name)
            missing = [n for n in sorted(wanted) if served is None or served.versions.get(n) is None]
            if not missing:
                break
            for number in missing:
                files = folder.versions[number]
                if served is not None:
                    served.versions.mark(number, LOADING)
                runner = await asyncio.get_running_loop().run_in_executor(self._thread, self._try_load, files)
                self._add(files, runner)
                served = self._served(name)
        if served is not None:
            for number in wanted:
                current = served.versions.get(number)
                if current is not None and current.state == DRAINING and (name, number) not in self._unloaded:
                    served.versions.restore(number)
        return wanted

    def _wanted(self, folder: ModelFolder, *, settled_only: bool) -> set[int]:
        """The versions the policy serves, among those that can be loaded now: settled (unchanged since the last
        read), not failed with the same files, not unloaded on request."""
        candidates = []
        for number, files in folder.versions.items():
            key = (folder.name, number)
            if key in self._unloaded:
                continue
            failed = self._failed.get(key)
            if failed is not None and failed[0] == files.signature:
                continue
            if settled_only and self._last_seen.get(key) != files.signature:
                continue  # new or still changing: loaded once a read finds it unchanged
            candidates.append(number)
        return (folder.policy or self.policy).select(candidates)

    def _try_load(self, files: VersionFiles) -> Runner | str:
        """The version's runner, or why it cannot serve (on the loader thread)."""
        started = time.monotonic()
        try:
            runner = self._load(self.config, files.path)
        except ModelLoadError as exc:
            return str(exc)
        except Exception as exc:  # a model the loader did not foresee: never the server's end
            return f"{type(exc).__name__}: {exc}"
        describe_in_log(runner, files.path, files.model, files.version, time.monotonic() - started)
        return runner

    def _add(self, files: VersionFiles, loaded: Runner | str) -> None:
        assert self._dataplane is not None
        key = (files.model, files.version)
        problem = loaded if isinstance(loaded, str) else self._mismatch(files.model, loaded)
        if problem is not None:
            if not isinstance(loaded, str):
                loaded.close()
            self._failed[key] = (files.signature, problem)
            metrics.MODEL_LOADS.labels(files.model, "failed").inc()
            log.error("model version not loaded; the versions already serving keep serving",
                      extra={"fields": {"model": files.model, "version": files.version, "path": str(files.path),
                                        "reason": problem}})
            if (served := self._served(files.model)) is not None:
                served.versions.mark(files.version, UNAVAILABLE, problem)
            return
        self._failed.pop(key, None)
        metrics.MODEL_LOADS.labels(files.model, "loaded").inc()
        if (served := self._served(files.model)) is not None:
            served.versions.add(ServingVersion(files.version, loaded))
        else:
            served = self._dataplane.add_model(files.model, loaded, files.version)
        version = served.versions.get(files.version)
        assert version is not None
        self._spawn(self._register(files.model, version.fingerprint, files.version))

    def _served(self, model: str) -> ServedModel | None:
        """The data plane's model of that name, if it serves one yet."""
        assert self._dataplane is not None
        return self._dataplane.served(model) if model in self._dataplane.model_names() else None

    def _mismatch(self, model: str, runner: Runner) -> str | None:
        """Why a loaded version cannot join its model (other shapes than the versions serving), or the server."""
        assert self._dataplane is not None
        description = runner.description
        if (served := self._served(model)) is not None:
            theirs = (served.input_features, served.output_size, served.per_timestep_outputs)
            ours = (description.input_features, description.output_size, description.per_timestep_outputs)
            if theirs != ours:
                return (f"its shapes (input features, output size, per-timestep outputs) are {ours}, the model's "
                        f"serving versions have {theirs}: a model's versions take the same inputs and give the "
                        "same outputs; serve it as another model")
        return self._fits(description.input_features, description.output_size)

    def _drop_drained(self) -> None:
        assert self._dataplane is not None
        now = time.monotonic()
        drain_s = self.config.version_drain_s
        for name in self._dataplane.model_names():
            versions = self._dataplane.served(name).versions
            for version in versions.serving():
                if version.state != DRAINING:
                    continue
                since = version.retired_at if version.unload_requested else max(version.retired_at, version.last_used)
                if now - since >= drain_s:
                    reason = f"retired ({version.reason}) and drained"
                    dropped = versions.drop(version.number, reason)
                    if dropped is not None:
                        # The model thread may still run a batch on it: close once that thread is free.
                        self._thread.submit(dropped.runner.close)
                    log.info("model version dropped", extra={"fields": {"model": name, "version": version.number,
                                                                         "reason": reason}})

    def _log_problems(self, folder: ModelFolder) -> None:
        for problem in folder.problems:
            if problem not in self._problems_logged:
                self._problems_logged.add(problem)
                log.warning("model repository entry skipped", extra={"fields": {"problem": problem}})


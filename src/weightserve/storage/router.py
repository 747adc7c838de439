"""Routing model names to local roots or remote back ends, under the operator's allow-list."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from weightserve.errors import ModelNotFoundError, PermissionDeniedError
from weightserve.storage.base import ModelLocation, Storage, parse_remote
from weightserve.storage.local import LocalRoots


class StorageRouter:
    """Resolves any model name a request may carry.

    Remote names are served only when they match an `--allow-source` pattern
    (`hf://*`, `hf://org/*`, `s3://bucket/prefix/*`), so a client cannot make the
    server fetch arbitrary repositories or buckets with the server's credentials.
    """

    def __init__(
        self,
        local: LocalRoots,
        remotes: Mapping[str, Storage] | None = None,
        allow: tuple[str, ...] = (),
        generated: Mapping[str, ModelLocation] | None = None,
    ) -> None:
        self.local = local
        self.remotes = dict(remotes or {})
        self.allow = allow
        self.generated = dict(generated or {})
        """Local names of models with no directory of their own (dummy weights); the roots win a clash."""

    def list_local(self) -> dict[str, ModelLocation]:
        """Every local model: the roots' directories, then generated models (blocking: walks the roots)."""
        found = {name: ModelLocation("local", name, path) for name, path in self.local.list_models().items()}
        for name, location in self.generated.items():
            found.setdefault(name, location)
        return dict(sorted(found.items()))

    def allowed(self, unversioned: str) -> bool:
        return any(fnmatch.fnmatchcase(unversioned, pattern) for pattern in self.allow)

    def resolve(self, name: str) -> ModelLocation:
        """Where `name`'s files are (blocking: a remote model may download first).

        Raises:
            ModelNotFoundError: unknown local name, unknown scheme, or missing remote model.
            PermissionDeniedError: a remote name the operator did not allow.
        """
        remote = parse_remote(name)
        if remote is None:
            try:
                return ModelLocation("local", name, self.local.resolve(name))
            except ModelNotFoundError:
                if name in self.generated:
                    return self.generated[name]
                raise
        if not self.allowed(remote.unversioned):
            raise PermissionDeniedError(
                f"{remote.unversioned} is not allowed on this server; the operator allows {list(self.allow) or 'none'}"
            )
        backend = self.remotes.get(remote.scheme)
        if backend is None:
            raise ModelNotFoundError(f"no storage back end for {remote.scheme}:// (have {sorted(self.remotes)})")
        return backend.resolve(remote)

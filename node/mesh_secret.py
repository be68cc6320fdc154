"""The mesh secret kept in the data dir (`mesh_secret`, mode 0600), and which secret a node uses.

Order: `--token`, `--mesh-secret-file`, `--mesh-secret`, `MESHLLM_MESH_SECRET`, else the data dir's
(created at random on first start). There is no public default: a node that was given nothing is
in a mesh of its own until another node joins it with its token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from discovery.join_token import decode_token, new_secret

SECRET_FILE = "mesh_secret"


@dataclass(frozen=True, slots=True)
class MeshSecret:
    secret: str
    bootstrap: tuple[str, ...]  # from a join token
    source: str  # "token" | "file" | "flag" | "env" | "data-dir" | "new"


def resolve_secret(
    data_dir: Path, *, token: str | None, secret: str | None, secret_file: Path | None, env: str | None
) -> MeshSecret:
    given = [name for name, v in (("--token", token), ("--mesh-secret", secret), ("--mesh-secret-file", secret_file)) if v]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if token:
        joined = decode_token(token)
        save_secret(data_dir, joined.secret)  # later starts of this node rejoin the same mesh
        return MeshSecret(joined.secret, joined.bootstrap, "token")
    if secret_file is not None:
        try:
            text = secret_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the mesh secret file {secret_file}: {e.strerror}") from None
        return MeshSecret(_non_empty(text, str(secret_file)), (), "file")
    if secret:
        return MeshSecret(secret, (), "flag")
    if env:
        return MeshSecret(env, (), "env")
    path = data_dir / SECRET_FILE
    if path.exists():
        return MeshSecret(_non_empty(path.read_text().strip(), str(path)), (), "data-dir")
    fresh = new_secret()
    save_secret(data_dir, fresh)
    return MeshSecret(fresh, (), "new")


def save_secret(data_dir: Path, secret: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)


def _non_empty(text: str, where: str) -> str:
    if not text:
        raise ValueError(f"the mesh secret in {where} is empty")
    return text

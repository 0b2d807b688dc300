"""Storage URIs (local paths, s3://, gs://) through pyarrow's filesystems: the one place that knows about them."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray Train needs that); URIs unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(uri) if is_local(uri) else uri


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_local(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    return pafs.FileSystem.from_uri(uri)


CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role), AWS_DEFAULT_REGION, and "
          "AWS_ENDPOINT_URL for other S3-compatible stores (MinIO, Ceph, moto)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file) or the node's workload identity",
}


class StorageAccessError(OSError):
    """An object-store URI that cannot be used (no bucket, no or wrong credentials); raised before any work."""


def check_access(uri: str, *, config_key: str) -> None:
    """Fail fast, naming ``uri``, ``config_key`` and the environment variables to set, when the bucket of an
    ``s3://`` / ``gs://`` URI does not exist or cannot be reached with the credentials this process has.

    Local paths pass (their errors already name the path). Ray workers must see the same environment variables
    as the driver (``ray start`` in that environment, or the job's runtime_env env_vars).
    """
    if is_local(uri):
        return
    scheme = uri.split("://", 1)[0]
    hint = CREDENTIAL_HINTS.get(scheme, "the credentials of that filesystem")
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as err:
        raise StorageAccessError(
            f"cannot reach {uri} ({config_key}): {err}. Check the credentials and endpoint: {hint}"
        ) from err
    if info.type == pafs.FileType.NotFound:
        raise StorageAccessError(
            f"bucket {bucket!r} of {uri} ({config_key}) does not exist or these credentials cannot see it: create "
            f"it, or set {config_key} to a bucket that exists; credentials and endpoint come from {hint}"
        )


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    """Write a small text file so readers never see half of it (temp + move where the filesystem can)."""
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write(text.encode())
    fs.move(tmp, path)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to a folder URI (a plain copy when the URI is local)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_run_dir(run_dir: str, name: str) -> "Path":
    """A local folder for a run's generated inputs (tiny model, toy world): ``run_dir`` itself when it is local,
    else a temp folder named after the run (the inputs are rebuilt, same bytes, wherever they are needed)."""
    import tempfile
    from pathlib import Path

    if is_local(run_dir):
        return Path(absolute(run_dir))
    return Path(tempfile.gettempdir()) / "rpo-pipeline" / name

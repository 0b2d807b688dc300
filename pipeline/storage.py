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

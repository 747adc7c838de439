"""GetManifest in pages: which slice of a plan one response carries, and the token for the next.

A plan of 100k tensors encodes to more than gRPC's default 4 MiB message limit, which
docs/wire.md promises every response respects. A page is a contiguous slice of the
plan's tensors in stream order, cut by encoded bytes (PAGE_BYTES) as well as by count
(MAX_PAGE_SIZE): names may be up to 4 KiB long, so a count alone bounds nothing.

A page token is opaque to clients: base64url of "<manifest id>:<start index>". The id
lets the server refuse a token minted for another plan (the model changed between two
pages) instead of silently splicing two plans together. Nothing here needs grpc or the
stubs: items are any messages with `ByteSize()`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from weightserve.errors import InvalidRequestError, PreconditionError

MAX_PAGE_SIZE = 10_000
"""Most tensors one page carries; a larger page_size means this many."""
PAGE_BYTES = 3 * 1024 * 1024
"""Most encoded bytes of one page: a quarter under gRPC's 4 MiB default, so any stock client receives it."""
UNPAGED_LIMIT = 4 * 1024 * 1024
"""Largest unpaged response: gRPC's default receive limit, which old clients still have."""
MAX_TOKEN_BYTES = 512
"""A token carries a manifest id (at most 256 bytes) and an index."""


class Sized(Protocol):
    def ByteSize(self) -> int: ...  # protobuf's spelling


Item = TypeVar("Item", bound=Sized)


@dataclass(frozen=True)
class PageRequest:
    """What one GetManifest asks for: `size` tensors (0: the whole plan) from the token's `start`."""

    size: int = 0
    manifest_id: str = ""
    """The manifest the token was minted for; empty on the first page."""
    start: int = 0

    def start_in(self, manifest_id: str, count: int) -> int:
        """The index this page starts at in a plan of `count` tensors with id `manifest_id`.

        Raises:
            PreconditionError: the token belongs to another manifest (the model changed).
            InvalidRequestError: the token points past the plan's end (it was not minted for it).
        """
        if self.manifest_id and self.manifest_id != manifest_id:
            raise PreconditionError(
                f"page_token belongs to manifest {self.manifest_id}, but the plan is manifest {manifest_id} now: "
                "the model changed between pages; fetch the manifest again from the first page"
            )
        if self.start > count:
            raise InvalidRequestError(f"page_token starts at tensor {self.start} of a plan of {count}")
        return self.start


def page_request(page_size: int, page_token: str) -> PageRequest:
    """A GetManifest's paging fields after their static checks.

    A token without a page_size pages at MAX_PAGE_SIZE: only the first request may
    ask for the unpaged answer.

    Raises:
        InvalidRequestError: a token this server did not mint (or one changed in transit).
    """
    size = min(page_size, MAX_PAGE_SIZE)
    if not page_token:
        return PageRequest(size)
    manifest_id, start = decode_token(page_token)
    return PageRequest(size or MAX_PAGE_SIZE, manifest_id, start)


def encode_token(manifest_id: str, start: int) -> str:
    """The token of the page that starts at tensor `start` of manifest `manifest_id`."""
    return base64.urlsafe_b64encode(f"{manifest_id}:{start}".encode()).decode("ascii").rstrip("=")


def decode_token(token: str) -> tuple[str, int]:
    """(manifest id, start index) of a token from encode_token.

    Raises:
        InvalidRequestError: anything else.
    """
    bad = InvalidRequestError("page_token is not one this server issued: pass next_page_token back unchanged")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidRequestError(f"page_token is {len(token)} bytes; the limit is {MAX_TOKEN_BYTES}")
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise bad from None
    manifest_id, sep, start = text.rpartition(":")
    if not sep or not manifest_id or not start.isdigit():
        raise bad
    return manifest_id, int(start)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def take(page: PageRequest, items: Iterable[Item], fixed_bytes: int, what: str) -> list[Item]:
    """The items one response carries: as many as fit, in order (see `fitting`).

    Args:
        page: the request; size 0 asks for every item in one response.
        items: the messages of a repeated field with a one-byte tag, from the page's start on.
        fixed_bytes: the encoded size of the rest of the response (next token included).
        what: names the list in the error ("the manifest of 'org/x' rank 0").

    Raises:
        PreconditionError: unpaged, and the response would exceed UNPAGED_LIMIT.
    """
    listed = list(items)
    return listed[: fitting(page, (item.ByteSize() for item in listed), fixed_bytes, what)]


def fitting(page: PageRequest, sizes: Iterable[int], fixed_bytes: int, what: str) -> int:
    """How many items, of these encoded sizes, one response carries.

    A paged response stops before PAGE_BYTES or page.size items (and carries at least
    one when any are left); an unpaged one carries every item.

    Raises:
        PreconditionError: unpaged, and the response would exceed UNPAGED_LIMIT.
    """
    limit = PAGE_BYTES if page.size else UNPAGED_LIMIT
    total = fixed_bytes
    count = 0
    for size in sizes:
        total += 1 + _varint_len(size) + size
        if total > limit:
            if not page.size:
                raise PreconditionError(
                    f"{what} encodes to more than {UNPAGED_LIMIT >> 20} MiB, over gRPC's default message "
                    f"limit: ask for it in pages (GetManifestRequest.page_size, at most {MAX_PAGE_SIZE}; "
                    "follow next_page_token)"
                )
            if count:
                break
        count += 1
        if count == page.size:
            break
    return count

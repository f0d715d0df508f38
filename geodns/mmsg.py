"""UDP datagrams a batch per system call: ``recvmmsg(2)`` and ``sendmmsg(2)`` through ctypes.

gdnsd answers a burst of queries with one ``recvmmsg`` and one ``sendmmsg``; Python's socket
module has neither, so a Python server pays two system calls per query (``recvfrom``,
``sendto``), each with its own kernel entry and its own Python argument parsing.  On loopback
at a saturating rate those calls are most of the CPU a memoized answer costs.  This module
keeps one set of preallocated ``mmsghdr`` arrays per socket and reads their results through
``memoryview`` casts, so a batch costs two foreign calls plus a few slice operations per
datagram.  :meth:`DatagramBatch.answer` goes further for a server whose replies are memoized:
the reply is written over its query in the same slot (the first two bytes, DNS's ID, stay)
and sent from there, so a memoized datagram costs no Python call at all.

Linux only (the structure layout is the 64-bit Linux ABI, checked at import); where it does
not hold, :data:`AVAILABLE` is False and the caller keeps ``recvfrom``/``sendto``.  The
environment variable ``MERIDIAN_UDP_MMSG=0`` turns it off too (A/B measurements, or a kernel
or seccomp profile that refuses these calls).

Hostile input: a datagram longer than :data:`SLOT_BYTES` arrives with ``MSG_TRUNC`` set (and
fills its slot, which is when the flag is read) and is reported truncated, never answered as
if whole (a DNS query is a few hundred bytes; the
largest legal EDNS query is far below this).  The sender's address is the kernel's, copied
into a fixed slot; nothing a client sends decides a length here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, Final

#: Datagrams per system call each way (gdnsd reads 64 per ``recvmmsg`` too).
BATCH: Final = 64
#: Bytes per datagram slot, both ways: more than any query; a longer reply goes by ``sendto``.
SLOT_BYTES: Final = 4096
#: Bytes per address slot: a ``sockaddr_in6`` (28) rounded up; a ``sockaddr_in`` is 16.
NAME_BYTES: Final = 32
_MSG_DONTWAIT: Final = 0x40
_MSG_TRUNC: Final = 0x20
#: Sender address bytes -> the host string ``recvfrom`` would give: senders repeat (resolvers).
HOST_MEMO_LIMIT: Final = 65_536


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


#: ``struct mmsghdr`` as 32-bit words (16): msg_namelen is word 2, msg_flags 12, msg_len 14.
_WORDS: Final = 16
_NAMELEN_WORD: Final = 2
_FLAGS_WORD: Final = 12
_LEN_WORD: Final = 14
#: From a message's length word back to its flags word.
_TRUNC_WORDS_BACK: Final = _LEN_WORD - _FLAGS_WORD
#: ... and as 64-bit words: msg_name is word 0 of 8; an iovec's iov_len is word 1 of 2.
_QWORDS: Final = 8


def _libc_calls() -> tuple[Any, Any] | None:
    if os.environ.get("MERIDIAN_UDP_MMSG", "1") == "0":
        return None
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    if ctypes.sizeof(_MMsgHdr) != 64 or _MMsgHdr.msg_len.offset != 56:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.restype = ctypes.c_int
    int_, pointer, uint = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint
    recvmmsg.argtypes = [int_, pointer, uint, int_, pointer]
    sendmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [int_, pointer, uint, int_]
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()
#: recvmmsg/sendmmsg are usable here.
AVAILABLE: Final = _CALLS is not None


class _Ring:
    """``BATCH`` message headers, each with one iovec into a ``SLOT_BYTES`` slot of a buffer
    (its own, or ``buffer``: the replies of :meth:`DatagramBatch.answer` are written over the
    queries they answer, and sent from there)."""

    def __init__(self, names: int, buffer: ctypes.Array[ctypes.c_char] | None = None) -> None:
        if buffer is None:
            buffer = ctypes.create_string_buffer(BATCH * SLOT_BYTES)
        self.buffer = buffer
        self.iovecs = (_IoVec * BATCH)()
        self.messages = (_MMsgHdr * BATCH)()
        base = ctypes.addressof(self.buffer)
        for i in range(BATCH):
            self.iovecs[i].iov_base = base + i * SLOT_BYTES
            self.iovecs[i].iov_len = SLOT_BYTES
            header = self.messages[i].msg_hdr
            header.msg_name = names + i * NAME_BYTES
            header.msg_namelen = NAME_BYTES
            header.msg_iov = ctypes.addressof(self.iovecs[i])
            header.msg_iovlen = 1
        self.address = ctypes.addressof(self.messages)
        self.bytes = memoryview(self.buffer).cast("B")
        self.words = memoryview(self.messages).cast("B").cast("I")
        self.qwords = memoryview(self.messages).cast("B").cast("Q")
        self.iov_qwords = memoryview(self.iovecs).cast("B").cast("Q")


class DatagramBatch:
    """Receive and send a socket's datagrams a batch at a time.

    :meth:`receive` reads up to ``BATCH`` datagrams; :meth:`datagram` gives datagram ``i``
    as ``recvfrom`` would, with a third address item: ``i``, the slot :meth:`send` answers
    to (the sender's address is sent back from the kernel's own copy, never re-encoded).
    """

    def __init__(self, sock: socket.socket) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _CALLS
        self._fd = sock.fileno()
        self._family = sock.family
        self._names = ctypes.create_string_buffer(BATCH * NAME_BYTES)
        names = ctypes.addressof(self._names)
        self._names_address = names
        self._name_bytes = memoryview(self._names).cast("B")
        self._name_words = memoryview(self._names).cast("B").cast("I")
        self._in = _Ring(names)
        self._out = _Ring(names, self._in.buffer)
        self._hosts: dict[bytes, str] = {}
        self._last = BATCH
        #: Per slot: its number, where its bytes start, the word of its length, and where
        #: its sender's address is (IPv4: a word of the names; IPv6: a byte offset).
        v4 = self._family == socket.AF_INET
        self._plan = tuple(
            (
                i,
                i * SLOT_BYTES,
                i * _WORDS + _LEN_WORD,
                i * (NAME_BYTES // 4) + 1 if v4 else i * NAME_BYTES + 8,
            )
            for i in range(BATCH)
        )
        #: Replies of :meth:`answer` longer than a slot, with their datagram's slot.
        self._overflow: list[tuple[bytes, int]] = []
        #: Datagrams longer than a slot, dropped unanswered.
        self.truncated = 0

    def receive(self) -> int:
        """Datagrams read into the slots (0: none waiting).  Raises ``OSError`` on an error
        other than "nothing to read"."""
        ring = self._in
        if self._family != socket.AF_INET:
            # The kernel wrote each slot's address length (value-result); a sockaddr_in6
            # needs the whole slot again.
            words = ring.words
            for i in range(self._last):
                words[i * _WORDS + _NAMELEN_WORD] = NAME_BYTES
        got: int = self._recvmmsg(self._fd, ring.address, BATCH, _MSG_DONTWAIT, None)
        if got < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
        self._last = got
        return got

    def datagram(self, i: int) -> tuple[bytes, tuple[Any, ...]] | None:
        """Datagram ``i`` of the last :meth:`receive` and its sender ``(host, port, i)``;
        None for one that did not fit its slot."""
        words = self._in.words
        if words[i * _WORDS + _FLAGS_WORD] & _MSG_TRUNC:
            self.truncated += 1
            return None
        start = i * SLOT_BYTES
        data = bytes(self._in.bytes[start : start + words[i * _WORDS + _LEN_WORD]])
        name = self._name_bytes[i * NAME_BYTES : i * NAME_BYTES + NAME_BYTES]
        port = name[2] << 8 | name[3]
        raw = bytes(name[4:8]) if self._family == socket.AF_INET else bytes(name[8:24])
        host = self._hosts.get(raw)
        if host is None:
            host = socket.inet_ntop(self._family, raw)
            if len(self._hosts) >= HOST_MEMO_LIMIT:
                self._hosts.clear()
            self._hosts[raw] = host
        return data, (host, port, i)

    def answer(
        self,
        shared: dict[bytes, tuple[bytes, int]],
        by_sender: dict[tuple[bytes, Any], tuple[bytes, int]],
        hits: list[int],
        compute: Callable[[int, bytes, Any], bytes | None],
    ) -> tuple[int, list[tuple[bytes, tuple[str, int], int]]]:
        """Receive a batch and answer it with one ``sendmmsg``: the read loop of a server
        whose replies are memoized by the datagram's bytes after its first two (a DNS query
        after its ID), and keep those two bytes (the ID) in front.

        A datagram's key is looked up in ``shared``, then with its sender in ``by_sender``
        (the sender as an ``int`` - the IPv4 address's four bytes as the machine reads them -
        or the IPv6 address's 16 bytes); a hit ``(reply after the ID, tally slot)`` counts
        ``hits[slot]`` and is written over the query, in its slot.  Anything else goes to
        ``compute(i, key, sender)``, which may read :meth:`datagram` ``i`` and returns the
        reply after the ID as well (or None: no reply).  Per memoized datagram this is one
        copy out of the slot (the key), one or two dict lookups and one copy in (the reply):
        no Python call, nothing else allocated.

        Returns the datagrams read (0: none waiting) and the replies not sent, as
        ``(reply, (host, port), errno)``: longer than a slot (errno 0, for ``sendto``) or
        refused by the kernel (EAGAIN: the send buffer is full)."""
        got = self.receive()
        if not got:
            return 0, []
        words = self._in.words
        slots = self._in.bytes
        lengths = self._out.iov_qwords
        pointers = self._out.qwords
        names = self._names_address
        v4 = self._family == socket.AF_INET
        name_words = self._name_words
        name_bytes = self._name_bytes
        shared_get = shared.get
        by_sender_get = by_sender.get
        moved: list[int] = []
        count = 0
        at = 0
        for i, start, length_at, sender_at in self._plan[:got]:
            size = words[length_at]
            if size >= SLOT_BYTES and words[length_at - _TRUNC_WORDS_BACK] & _MSG_TRUNC:
                self.truncated += 1
                continue
            key = bytes(slots[start + 2 : start + size])
            memo = shared_get(key)
            if memo is None:
                if v4:
                    sender: Any = name_words[sender_at]
                else:
                    sender = bytes(name_bytes[sender_at : sender_at + 16])
                memo = by_sender_get((key, sender))
                if memo is None:
                    tail = compute(i, key, sender)
                    if tail is None:
                        continue
                else:
                    hits[memo[1]] += 1
                    tail = memo[0]
            else:
                hits[memo[1]] += 1
                tail = memo[0]
            size = len(tail) + 2
            if size > SLOT_BYTES:
                self._overflow.append((bytes(slots[start : start + 2]) + tail, i))
                continue
            if at != start:  # an earlier datagram got no reply: this one moves down
                slots[at : at + 2] = slots[start : start + 2]
                pointers[count * _QWORDS] = names + i * NAME_BYTES
                moved.append(count)
            slots[at + 2 : at + size] = tail
            lengths[2 * count + 1] = size
            count += 1
            at += SLOT_BYTES
        unsent: list[tuple[bytes, tuple[str, int], int]] = []
        if count:
            for k, code in self._flush(count):
                at = k * SLOT_BYTES
                slot = (pointers[k * _QWORDS] - names) // NAME_BYTES
                reply = bytes(slots[at : at + lengths[2 * k + 1]])
                unsent.append((reply, self.sender(slot), code))
        for k in moved:  # message k answers slot k again
            pointers[k * _QWORDS] = names + k * NAME_BYTES
        if self._overflow:
            unsent.extend((reply, self.sender(i), 0) for reply, i in self._overflow)
            self._overflow.clear()
        return got, unsent

    def sender(self, i: int) -> tuple[str, int]:
        """The sender of datagram ``i`` of the last :meth:`receive`, as ``recvfrom`` gives it
        (host and port)."""
        name = self._name_bytes[i * NAME_BYTES : i * NAME_BYTES + NAME_BYTES]
        raw = bytes(name[4:8]) if self._family == socket.AF_INET else bytes(name[8:24])
        return socket.inet_ntop(self._family, raw), name[2] << 8 | name[3]

    def _flush(self, count: int) -> list[tuple[int, int]]:
        """``sendmmsg`` the first ``count`` messages of the out ring; returns those not sent
        as ``(message, errno)``."""
        failed: list[tuple[int, int]] = []
        sent_at = 0
        while sent_at < count:
            sent: int = self._sendmmsg(
                self._fd, self._out.address + sent_at * ctypes.sizeof(_MMsgHdr), count - sent_at, 0
            )
            if sent > 0:
                sent_at += sent
                continue
            code = ctypes.get_errno() if sent < 0 else errno.EAGAIN
            if code == errno.EINTR:
                continue
            if code == errno.EAGAIN:
                failed.extend((k, code) for k in range(sent_at, count))
                break
            failed.append((sent_at, code))  # this one refused; go on with the rest
            sent_at += 1
        return failed

    def send(self, replies: list[tuple[bytes, tuple[Any, ...]]]) -> list[tuple[int, int]]:
        """Send each ``(reply, address)`` to the slot in ``address[2]``: the replies of one
        :meth:`receive` batch, before the next.  Returns what was not sent, as ``(index into
        replies, errno)``: a reply longer than a slot (errno 0: the caller uses ``sendto``),
        or one the kernel refused (EAGAIN: the send buffer is full, for it and all after)."""
        ring = self._out
        failed: list[tuple[int, int]] = []
        count = 0
        slots: list[int] = []
        buffer, qwords, iov_qwords = ring.bytes, ring.qwords, ring.iov_qwords
        names = self._names_address
        for index, (out, address) in enumerate(replies):
            size = len(out)
            if size > SLOT_BYTES:
                failed.append((index, 0))
                continue
            start = count * SLOT_BYTES
            buffer[start : start + size] = out
            iov_qwords[2 * count + 1] = size
            qwords[count * _QWORDS] = names + address[2] * NAME_BYTES
            slots.append(index)
            count += 1
        failed.extend((slots[k], code) for k, code in self._flush(count))
        for k in range(count):  # message k answers slot k again (as answer() expects)
            qwords[k * _QWORDS] = names + k * NAME_BYTES
        return failed

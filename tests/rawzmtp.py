"""A raw ZMTP 3.0 client (NULL or CurveZMQ, RFC 23/26) over a plain TCP socket, for attack tests and the
fuzzer: unlike libzmq, it puts frames of a message that never ends on the wire (libzmq's own sender
holds an unfinished multipart message back until its last frame)."""

from __future__ import annotations

import os
import socket
import struct

from nacl.bindings import crypto_box, crypto_box_keypair, crypto_box_open

SOCKET_TYPE = b"\x0bSocket-Type\x00\x00\x00\x06DEALER"


def _greeting(mechanism: bytes) -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\x00") + b"\x00" + bytes(31)


def _frame(body: bytes, flags: int) -> bytes:
    if len(body) <= 255:
        return bytes([flags]) + bytes([len(body)]) + body
    return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body


def _command(body: bytes) -> bytes:
    return _frame(body, 0x04)


class RawPeer:
    """Connect, handshake, then `send_frame(data, more)` writes one frame straight to the socket."""

    def __init__(self, host: str, port: int, server_key: bytes | None, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.curve = server_key is not None
        self.nonce = 0
        if server_key is None:
            self.sock.sendall(_greeting(b"NULL"))
            self._read_exact(64)
            self.sock.sendall(_command(b"\x05READY" + SOCKET_TYPE))
            self._read_command()
            return
        self.server_key = server_key
        long_public, long_secret = crypto_box_keypair()
        self.short_public, self.short_secret = crypto_box_keypair()
        self.sock.sendall(_greeting(b"CURVE"))
        self._read_exact(64)
        self.nonce += 1
        short_nonce = struct.pack(">Q", self.nonce)
        hello_box = crypto_box(bytes(64), b"CurveZMQHELLO---" + short_nonce, server_key, self.short_secret)
        self.sock.sendall(_command(b"\x05HELLO" + b"\x01\x00" + bytes(72) + self.short_public + short_nonce + hello_box))
        welcome = self._read_command()
        assert welcome[:8] == b"\x07WELCOME", welcome[:8]
        plain = crypto_box_open(welcome[24:], b"WELCOME-" + welcome[8:24], server_key, self.short_secret)
        self.server_short, cookie = plain[:32], plain[32:128]
        vouch_nonce = os.urandom(16)
        vouch = crypto_box(self.short_public + server_key, b"VOUCH---" + vouch_nonce, self.server_short, long_secret)
        self.nonce += 1
        short_nonce = struct.pack(">Q", self.nonce)
        initiate_box = crypto_box(long_public + vouch_nonce + vouch + SOCKET_TYPE, b"CurveZMQINITIATE" + short_nonce,
                                  self.server_short, self.short_secret)
        self.sock.sendall(_command(b"\x08INITIATE" + cookie + short_nonce + initiate_box))
        ready = self._read_command()
        assert ready[:6] == b"\x05READY", ready[:6]

    def _read_exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            data += chunk
        return data

    def _read_command(self) -> bytes:
        flags = self._read_exact(1)[0]
        size = struct.unpack(">Q", self._read_exact(8))[0] if flags & 0x02 else self._read_exact(1)[0]
        return self._read_exact(size)

    def frame_bytes(self, data: bytes, more: bool) -> bytes:
        """The wire bytes of one message frame (encrypted under CurveZMQ)."""
        if not self.curve:
            return _frame(data, 0x01 if more else 0x00)
        self.nonce += 1
        short_nonce = struct.pack(">Q", self.nonce)
        box = crypto_box(bytes([1 if more else 0]) + data, b"CurveZMQMESSAGEC" + short_nonce, self.server_short,
                         self.short_secret)
        return _frame(b"\x07MESSAGE" + short_nonce + box, 0x00)  # a plain ZMTP frame, as libzmq sends it

    def send_frame(self, data: bytes, more: bool) -> None:
        self.sock.sendall(self.frame_bytes(data, more))

    def send_message(self, frames: list[bytes]) -> None:
        self.sock.sendall(b"".join(self.frame_bytes(f, i < len(frames) - 1) for i, f in enumerate(frames)))

    def close(self) -> None:
        self.sock.close()

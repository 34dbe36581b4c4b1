"""Who may write what, and who may take part: signed DHT records and private swarms.

* Every DHT record swarmtune writes is stored under a subkey equal to the writer's peer id and
  signed with that peer's libp2p identity key (RSA, as hivemind generates it). Since a peer id is
  the hash of its public key, anyone can check that only the server itself wrote (or overwrote)
  its announcement; unsigned or forged records are rejected by every node and client.
* A private swarm is closed either by a shared secret (`--swarm-key FILE`) or an allowlist of
  peer ids (`--allowed-peers`). Outsiders can then neither read nor write the DHT (its RPCs are
  authenticated), nor call servers (each RPC carries a membership token, bound to the caller's
  authenticated peer id, or the caller must be on the allowlist).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import hmac
import os
import secrets
import tempfile
import time

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.serializer import MSGPackSerializer

_SIG_MARK = b"[swarmtune-signed:"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


# ---- identities ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Identity:
    """A peer's libp2p key pair, loaded from the key file its daemon uses."""

    path: str
    private_key: rsa.RSAPrivateKey
    public_der: bytes   # libp2p's serialized public key
    peer_id: str

    @classmethod
    def load_or_create(cls, path: str | None) -> Identity:
        if path is None:
            path = os.path.join(tempfile.mkdtemp(prefix="swarmtune-id-"), "identity.key")
        if not os.path.exists(path):
            P2P.generate_identity(path)
        with open(path, "rb") as f:
            data = f.read()
        key = serialization.load_der_private_key(crypto_pb2.PrivateKey.FromString(data).data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA identity")
        return cls(path, key, _public_der(key.public_key()), PeerID.from_identity(data).to_base58())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _PSS, hashes.SHA256())


def _public_der(key: rsa.RSAPublicKey) -> bytes:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def peer_id_of(public_der: bytes) -> str:
    digest = multihash.encode(hashlib.sha256(public_der).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


# ---- signed records --------------------------------------------------------------------------------


class PeerSignatureValidator(RecordValidatorBase):
    """Accepts only records whose subkey is a peer id and whose value that peer signed.

    `identity` signs this peer's own records; `allowed` (peer ids), if given, also rejects
    records written by anyone outside it.
    """

    def __init__(self, identity: Identity | None = None, allowed: set[str] | None = None):
        self.identity, self.allowed = identity, allowed

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None or _subkey(record) != self.identity.peer_id:
            return record.value
        signature = self.identity.sign(_signed_bytes(record))
        return record.value + _SIG_MARK + base64.b64encode(self.identity.public_der) + b":" + \
            base64.b64encode(signature) + b"]"

    def validate(self, record: DHTRecord) -> bool:
        peer_id = _subkey(record)
        head, mark, tail = record.value.rpartition(_SIG_MARK)
        if not peer_id or not mark or not tail.endswith(b"]"):
            return False
        try:
            public_b64, signature_b64 = tail[:-1].split(b":")
            public_der, signature = base64.b64decode(public_b64), base64.b64decode(signature_b64)
            if peer_id_of(public_der) != peer_id or (self.allowed is not None and peer_id not in self.allowed):
                return False
            public = serialization.load_der_public_key(crypto_pb2.PublicKey.FromString(public_der).data)
            public.verify(signature, _signed_bytes(dataclasses.replace(record, value=head)), _PSS, hashes.SHA256())
        except (ValueError, TypeError, InvalidSignature, AttributeError):
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value.rpartition(_SIG_MARK)[0] or record.value

    @property
    def priority(self) -> int:
        return 10  # run before anything that deserializes the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PeerSignatureValidator)


def _subkey(record: DHTRecord) -> str | None:
    try:
        subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
    except Exception:
        return None
    return subkey if isinstance(subkey, str) else None


def _signed_bytes(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps([record.key, record.subkey, record.value, record.expiration_time])


# ---- private swarms --------------------------------------------------------------------------------


def generate_swarm_key(path: str) -> None:
    """Write a new random swarm key (hex) readable only by its owner."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def read_swarm_key(path: str) -> bytes:
    with open(path) as f:
        text = f.read().strip()
    key = bytes.fromhex(text)
    if len(key) < 16:
        raise ValueError(f"swarm key in {path} is too short: use python -m swarmtune.security keygen FILE")
    return key


class SwarmKeyAuthorizer(AuthorizerBase):
    """Authenticates every DHT request and response with an HMAC under the swarm key."""

    def __init__(self, key: bytes, max_skew: float = 300.0):
        self.key, self.max_skew = key, max_skew
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def _mac(self, message) -> bytes:
        auth = message.auth
        signature, auth.signature = auth.signature, b""
        try:
            return hmac.new(self.key, message.SerializeToString(deterministic=True), "sha256").digest()
        finally:
            auth.signature = signature

    async def sign_request(self, request, service_public_key) -> None:
        request.auth.time = time.time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = self._mac(request)

    async def validate_request(self, request) -> bool:
        auth = request.auth
        if not hmac.compare_digest(auth.signature, self._mac(request)):
            return False
        if abs(time.time() - auth.time) > self.max_skew or auth.nonce in self._seen:
            return False  # stale or replayed
        self._seen[auth.nonce] = auth.time
        while len(self._seen) > 100_000:
            self._seen.popitem(last=False)
        return True

    async def sign_response(self, response, request) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = self._mac(response)

    async def validate_response(self, response, request) -> bool:
        return response.auth.nonce == request.auth.nonce and \
            hmac.compare_digest(response.auth.signature, self._mac(response))


@dataclasses.dataclass
class Membership:
    """The rules of a private swarm (both fields None: an open swarm)."""

    swarm_key: bytes | None = None
    allowed_peers: set[str] | None = None

    @classmethod
    def from_options(cls, swarm_key_path: str | None, allowed_peers: list[str] | None) -> Membership:
        key = read_swarm_key(swarm_key_path) if swarm_key_path else None
        return cls(key, set(allowed_peers) if allowed_peers else None)

    @property
    def private(self) -> bool:
        return self.swarm_key is not None or self.allowed_peers is not None

    def token(self, peer_id: str) -> str:
        """What a member puts in each RPC: proof of the key, bound to its own (authenticated) peer id."""
        if self.swarm_key is None:
            return ""
        return hmac.new(self.swarm_key, f"swarmtune-member:{peer_id}".encode(), "sha256").hexdigest()

    def admits(self, peer_id: str, token: str) -> bool:
        if self.allowed_peers is not None and peer_id not in self.allowed_peers:
            return False
        return self.swarm_key is None or hmac.compare_digest(token, self.token(peer_id))

    def authorizer(self) -> SwarmKeyAuthorizer | None:
        return SwarmKeyAuthorizer(self.swarm_key) if self.swarm_key is not None else None


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m swarmtune.security")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a new swarm key for a private swarm")
    keygen.add_argument("path")
    peer = sub.add_parser("peer-id", help="print the peer id of an identity file (for --allowed-peers)")
    peer.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        generate_swarm_key(args.path)
        print(f"wrote a new swarm key to {args.path}; give it to every member with --swarm-key {args.path}")
    else:
        print(Identity.load_or_create(args.path).peer_id)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# An implementation of docs/protocol.md "Version 2" written from the document alone, independent
# of the Rust code: prints the test vector's values (hex) for comparison with the document.
import hmac, hashlib, struct, base64
H = lambda k, m: hmac.new(k, m, hashlib.sha256).digest()
def hkdf(salt, ikm, info, n=32):
    prk = H(salt, ikm)
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = H(prk, t + info + bytes([i])); out += t; i += 1
    return out[:n]
def frame(kind, payload): return b"VMTK" + bytes([2, kind]) + struct.pack(">H", len(payload)) + payload
str8 = lambda s: bytes([len(s)]) + s
K = bytes(range(32)); key_id = 1
nb = bytes(range(0x40, 0x60)); ns = bytes(range(0x60, 0x80))
hello = frame(1, str8(b"vm-42") + str8(b"host-b/4242") + struct.pack(">H", key_id) + nb)
wbody = bytes([1]) + struct.pack(">I", 10000) + str8(b"host-a/1") + struct.pack(">I", 1500) + ns
wprefix = frame(2, wbody + b"\0" * 32)[:-32]
mac_s = H(K, b"vmtk-v2 source" + hello + wprefix)
welcome = wprefix + mac_s
mac_b = H(K, b"vmtk-v2 backup" + hello + wprefix)
auth = frame(9, mac_b)
k_sb = hkdf(nb + ns, K, b"vmtk-v2 source to backup")
k_bs = hkdf(nb + ns, K, b"vmtk-v2 backup to source")
def seal(key, kind, seq, body):
    f = frame(kind, struct.pack(">Q", seq) + body + b"\0" * 16)[:-16]
    return f + H(key, f)[:16]
hb = seal(k_sb, 4, 0, struct.pack(">Q", 1))
handoff = seal(k_sb, 6, 1, b"")
result = seal(k_bs, 7, 0, bytes([0]) + b"vm started")
rprefix = frame(3, bytes([4]) + b"too many pending handshakes" + b"\0" * 32)[:-32]
reject_busy = rprefix + H(K, b"vmtk-v2 reject" + hello + rprefix)
reject_auth = frame(3, bytes([8]) + b"authentication failed" + b"\0" * 32)
print("key-file", "1", base64.b64encode(K).decode())
for n, v in [("hello", hello), ("welcome", welcome), ("auth", auth), ("k_sb", k_sb), ("k_bs", k_bs),
             ("heartbeat", hb), ("handoff", handoff), ("handoff_result", result),
             ("reject_busy", reject_busy), ("reject_auth", reject_auth)]:
    print(n, len(v), v.hex())

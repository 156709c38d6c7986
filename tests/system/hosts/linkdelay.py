"""A slow, lossy link without ``tc netem``: this machine's kernel is built without sch_netem
(``CONFIG_NET_SCH_NETEM`` is not set), but it has NFQUEUE. An iptables rule inside a host's namespace
hands each matching packet to this program, which accepts it ``--delay`` seconds later (in order) or
drops it with probability ``--loss``. That is what ``tc qdisc add dev <veth> root netem delay 200ms loss
5%`` does to the same packets.

    ip netns exec NS python linkdelay.py --queue 7 --delay 0.2 --loss 0.05 --seconds 600

The rule uses ``--queue-bypass``, so packets pass untouched while no program listens. The program stops
by itself after ``--seconds`` (a bounded fault), or on SIGTERM; it prints what it did on stderr.

Plain netlink (NETLINK_NETFILTER, nfnetlink_queue), no library: the message layouts are those of
linux/netfilter/nfnetlink_queue.h.
"""

from __future__ import annotations

import argparse
import collections
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _parse(data: bytes):
    """(type, attrs) for each netlink message in ``data``."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            return
        attrs, pos, end = {}, offset + 20, offset + length
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            yield NLMSG_ERROR, {"error": code}
        else:
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                attrs[akind & 0x7FFF] = data[pos + 4:pos + alen]
                pos += (alen + 3) & ~3
            yield msg_type & 0xFF, attrs
        offset += (length + 3) & ~3


def run(queue: int, delay: float, loss: float, seconds: float) -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)),
                       NLM_F_REQUEST | NLM_F_ACK, 1))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                       NLM_F_REQUEST | NLM_F_ACK, 2))
    stop_at = time.monotonic() + seconds
    stopping = False

    def _stop(*_args: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    pending: collections.deque[tuple[float, int]] = collections.deque()
    passed = dropped = 0
    rng = random.Random()
    while not stopping and time.monotonic() < stop_at:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _due, packet_id = pending.popleft()
            sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT,
                                                                                              packet_id))))
            passed += 1
        wait = max(0.0, min(0.05, pending[0][0] - now)) if pending else 0.05
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            continue
        data = sock.recv(1 << 16)
        for msg_type, attrs in _parse(data):
            if msg_type == NLMSG_ERROR and attrs["error"]:
                print(f"linkdelay: netlink error {attrs['error']}", file=sys.stderr)
                return 1
            if msg_type != NFQNL_MSG_PACKET or NFQA_PACKET_HDR not in attrs:
                continue
            (packet_id,) = struct.unpack_from("!I", attrs[NFQA_PACKET_HDR])
            if rng.random() < loss:
                sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_DROP,
                                                                                                  packet_id))))
                dropped += 1
            else:
                pending.append((time.monotonic() + delay, packet_id))
    for _due, packet_id in pending:  # what waits when the fault ends goes through now
        sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT,
                                                                                          packet_id))))
    print(f"linkdelay: queue {queue}: {passed + len(pending)} packets passed after {delay * 1000:.0f} ms, "
          f"{dropped} dropped", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    return run(args.queue, args.delay, args.loss, args.seconds)


if __name__ == "__main__":
    sys.exit(main())

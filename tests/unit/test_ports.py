"""The test harness's port allocator (tests.helpers.free_port): the servers of parallel tests must never be
handed the same port, nor one in the kernel's ephemeral range, where bind(0) and outgoing connections land."""

from __future__ import annotations

import contextlib
import socket

from tests.helpers import PORT_BASE, PORT_BLOCK, PORT_BLOCKS, _ephemeral_low, free_port


def test_ports_are_distinct_below_the_ephemeral_range_and_never_one_in_use() -> None:
    with contextlib.ExitStack() as stack:
        held: set[int] = set()
        for _ in range(50):  # every port handed out is then listened on, as a server would
            port = free_port()
            assert port not in held
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", port))
            s.listen()
            held.add(port)
        if PORT_BASE + PORT_BLOCK * PORT_BLOCKS <= _ephemeral_low():
            assert all(PORT_BASE <= p < PORT_BASE + PORT_BLOCK * PORT_BLOCKS for p in held)
            assert max(held) - min(held) < PORT_BLOCK  # this worker's block only
        # once round the whole block, past the held ports again: each is skipped while it is in use
        assert not {free_port() for _ in range(PORT_BLOCK)} & held


def test_a_bus_port_pair_is_free_on_both_ports() -> None:
    port = free_port(bus_offset=10_000)
    for p in (port, port + 10_000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_another_process_gets_another_block() -> None:
    """Concurrent test runs (or workers) on one machine: the block is claimed with a lock file, so a second
    process with the same worker id takes the next free block while this one holds its own."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    mine = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", "from tests.helpers import free_port; print(free_port())"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    theirs = int(out.stdout)
    if PORT_BASE + PORT_BLOCK * PORT_BLOCKS <= _ephemeral_low():
        assert (theirs - PORT_BASE) // PORT_BLOCK != (mine - PORT_BASE) // PORT_BLOCK, (mine, theirs)


def test_a_replica_offset_stays_inside_the_block() -> None:
    for _ in range(300):  # round the block: no base whose +10 crosses into the next process's block
        port = free_port(bus_offset=10)
        assert (port - PORT_BASE) // PORT_BLOCK == (port + 10 - PORT_BASE) // PORT_BLOCK

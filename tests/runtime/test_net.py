"""Addresses and ports: where a worker binds, given the address the topology gives it."""

from __future__ import annotations

import socket

import pytest

from stagemesh.runtime import net
from stagemesh.runtime.net import bind_address, default_host, free_port, port_of, reserve


def test_port_of_reads_ipv4_ipv6_and_names():
    assert port_of("127.0.0.1:50051") == 50051
    assert port_of("[::1]:7") == 7
    assert port_of("stage-c0-s1:41001") == 41001


@pytest.mark.parametrize("address", ["127.0.0.1", "host:", "host:port"])
def test_port_of_names_an_address_without_a_port(address):
    with pytest.raises(ValueError, match="is not host:port"):
        port_of(address)


def test_loopback_stays_loopback_and_anything_else_binds_every_interface():
    assert default_host("127.0.0.1:1") == "127.0.0.1"
    assert default_host("localhost:1") == "localhost"
    assert default_host("[::1]:1") == "[::1]"
    assert default_host("10.0.0.7:1") == "[::]"
    assert default_host("stage-c0-s0:1") == "[::]"


def test_bind_address_takes_the_host_flag_over_the_topology_host():
    assert bind_address(None, "10.0.0.7:41001") == "[::]:41001"
    assert bind_address("0.0.0.0", "10.0.0.7:41001") == "0.0.0.0:41001"


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_never_hands_out_a_port_twice_in_one_process():
    ports = [free_port() for _ in range(300)]  # a plan takes all its ports before any is bound
    assert len(set(ports)) == len(ports)


def test_a_reserved_port_is_never_handed_out_even_when_the_kernel_offers_it(monkeypatch):
    """The kernel offers the reserved port first (as it did a client port that the process which
    picked it had just closed); free_port takes the next one."""
    reserved, other = free_port(), free_port()
    reserve(reserved)
    offers = iter([reserved, other])

    class Offering(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offers))

    monkeypatch.setattr(net.socket, "socket", Offering)
    net._HANDED_OUT.discard(other)
    assert free_port() == other

"""A free local TCP port, for the tests that start servers or process groups."""
import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

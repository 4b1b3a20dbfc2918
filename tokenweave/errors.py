"""Exceptions raised by tokenweave."""


class TokenweaveError(RuntimeError):
    """Base class of tokenweave's runtime errors."""


class CollectiveTimeoutError(TokenweaveError):
    """A rank waited longer than TOKENWEAVE_TIMEOUT_MS for a peer. The communicator is broken."""

    def __init__(self, message, *, op=None, rank=None, peer=None, seq=None):
        super().__init__(message)
        self.op, self.rank, self.peer, self.seq = op, rank, peer, seq


class CollectiveMismatchError(TokenweaveError):
    """Ranks made different calls (op, shape, dtype or launch settings). The communicator is broken."""

    def __init__(self, message, *, op=None, rank=None, peer=None, seq=None):
        super().__init__(message)
        self.op, self.rank, self.peer, self.seq = op, rank, peer, seq


class CommunicatorClosedError(TokenweaveError):
    """The communicator was closed."""

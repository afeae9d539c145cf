"""One error hierarchy for the whole service. No grpc import: errormapping.py maps these to statuses."""

from __future__ import annotations


class RerankerError(Exception):
    """Base class; the message is safe to show to the caller."""


class InvalidRequest(RerankerError):
    """The request is malformed; the message names the offending field."""


class ResourceLimit(InvalidRequest):
    """The request exceeds a configured size limit (too many candidates, events, ...)."""


class NotReady(RerankerError):
    """The model is still loading or warming up; retry later."""


class Overloaded(RerankerError):
    """Work queues are full; the caller should back off."""


class EncoderFailed(RerankerError):
    """The encoder raised or produced unusable vectors."""


class EncoderUnavailable(EncoderFailed):
    """A remote encoder could not be reached, timed out or answered with a server error."""


class EncodeTimeout(RerankerError):
    """Encoding did not finish within the time the request had."""


class RequestCancelled(RerankerError):
    """The caller cancelled the RPC (or it ended) while work was still pending; the work was dropped."""
